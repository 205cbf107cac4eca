"""tools/bench_seeds.py: the quality benchmark's command with a seed, and the int8 − probe
summary over seeds (synthetic accuracies; the real runs are the benchmark's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_seeds as bs  # noqa: E402


def test_the_command_is_the_quality_benchmarks_and_carves_dev_only_without_one():
    model = Path("/m")
    b77 = bs.train_flags("banking77", model)
    assert "--dev" not in b77  # ptedge carves it, drawn by --seed
    assert b77[b77.index("--template") + 1] == "[P:3] {text} [P:3] [MASK]"
    assert b77[b77.index("--label-field") + 1] == "category"
    clinc = bs.train_flags("clinc150", model)
    assert Path(clinc[clinc.index("--dev") + 1]).name == "dev.csv"
    for flags in (b77, clinc):  # defaults only: no tuning flags
        assert not {"--lr", "--head-lr", "--pool", "--steps", "--batch-size"} & set(flags)


def _run(seed, fp32, int8, refit="trained"):
    return {
        "task": "banking77",
        "seed": seed,
        "steps": 602,
        "batch_size": 32,
        "defaults": {"head_refit": {"value": refit}},
        "fp32": {"accuracy": fp32, "n": 1000},
        "int8": {"accuracy": int8, "n": 1000},
    }


def test_summary_is_int8_minus_probe_per_seed_with_its_standard_error():
    runs = [_run(0, 0.925, 0.920), _run(1, 0.930, 0.930), _run(2, 0.920, 0.925)]
    probes = [
        {"task": "banking77", "seed": s, "accuracy": a, "fit": "lr 0.03"}
        for s, a in ((0, 0.924), (1, 0.926), (2, 0.925))
    ]
    cells = bs.summarise(runs, probes)["banking77"]
    m = cells["mean"]
    assert m["int8_minus_probe_by_seed"] == pytest.approx([-0.4, 0.4, 0.0])
    assert m["int8_minus_probe_points"] == pytest.approx(0.0)
    assert m["se_points"] == pytest.approx(0.4 / 3**0.5)
    assert m["ahead"] == 2 and m["int8"] == pytest.approx(0.925)
    result = {
        "machine": bs.bc.machine(),
        "command": "python tools/bench_seeds.py",
        "wall_s": 60,
        "runs": [r | {"train_s": 600.0} for r in runs],
        "tasks": {"banking77": cells},
    }
    md = bs.markdown(result)
    assert "| banking77 | 0 | 602 × 32 | trained | 0.9250 | 0.9200 | 0.9240 (lr 0.03) | -4 |" in md
    assert "mean +0.00 ± 0.23 (level or ahead on 2 of 3 seeds; n = 1000)" in md
    assert "training took 30 min over the 3 runs" in md
