"""tools/bench_quality.py: a --tasks subset run keeps the other tasks' earlier results."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_quality as bq  # noqa: E402


def _result(tasks, command, quick=False):
    r = {
        "quick": quick,
        "command": command,
        "wall_s": 60.0,
        "timings": {f"{t} (total)": 1.0 for t in tasks},
        "machine": {"load_avg_at_end": [0.5, 0.5, 0.5]},
    }
    return r | {t: {"from": command} for t in tasks}


def test_subset_run_keeps_other_tasks(tmp_path):
    path = tmp_path / "quality.json"
    first = _result(["lama", "sst2", "banking77"], "all")
    bq.merge_earlier(first, path, ["lama", "sst2", "banking77"])
    path.write_text(json.dumps(first))
    second = _result(["sst2"], "sst2 again")
    bq.merge_earlier(second, path, ["sst2"])
    assert second["sst2"] == {"from": "sst2 again"}
    assert second["lama"] == second["banking77"] == {"from": "all"}
    assert [(p["command"], p["tasks"]) for p in second["parts"]] == [
        ("all", ["lama", "banking77"]),
        ("sst2 again", ["sst2"]),
    ]


def test_quick_results_never_mix_with_full(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(_result(["lama"], "quick", quick=True)))
    full = _result(["sst2"], "full")
    bq.merge_earlier(full, path, ["sst2"])
    assert "lama" not in full and len(full["parts"]) == 1
