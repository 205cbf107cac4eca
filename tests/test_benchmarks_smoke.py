"""Smoke tests of the benchmarks: tools/bench_speed.py and tools/bench_quality.py, --quick.

Each runs the script as a user does (a fresh process, the real backbones, the shared
data) into a temporary ``--out`` and ``--work``, and checks that the JSON, the markdown
table and the PNG chart exist and hold the expected keys. Slow (minutes): quick mode still
trains, exports (fp32 and int8) and scores on both real backbones. The numbers themselves
are not checked: quick sizes measure nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_data

pytestmark = [pytest.mark.slow, pytest.mark.bench]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYSTEMS = ("peft", "ptedge_fp32", "ptedge_int8")


def _bench(script: str, tmp_path: Path, *extra: str) -> Path:
    for mod in ("torch", "transformers", "peft", "optimum", "matplotlib", "onnxruntime"):
        pytest.importorskip(mod)
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "tools" / script), "--quick", "--out", str(out)]
    cmd += ["--work", str(work), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-6000:]}"
    return out


def _outputs(out: Path, stem: str) -> tuple[dict, str]:
    data = json.loads((out / f"{stem}.json").read_text())
    md = (out / f"{stem}.md").read_text()
    png = (out / f"{stem}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    m = data["machine"]
    for key in ("date", "cpu", "cores", "versions", "git"):
        assert key in m, key
    assert m["versions"]["ptedge"] and m["versions"]["onnxruntime"]
    assert m["cpu"] in md and data["quick"] is True
    assert data["wall_s"] > 0 and data["timings"]
    return data, md


def test_bench_speed_quick(tmp_path):
    shared_data("banking77", "test.csv")
    shared_data("sst2", "test.tsv")
    data, md = _outputs(_bench("bench_speed.py", tmp_path), "speed")
    assert set(data["models"]) == {"minilm", "smollm2"}
    for name, r in data["models"].items():
        for s in SYSTEMS:
            got = r["systems"][s]
            assert got["latency_b1_ms"]["p50"] > 0 and got["latency_b1_ms"]["p90"] > 0
            assert got["latency_b1_alone_ms"]["p50"] > 0  # each system in its own process
            for key in ("throughput_b32", "cold_start_s", "cold_peak_rss_mb", "size_mb"):
                assert got[key] > 0, (name, s, key)
        ratios = r["ratios_peft_over_int8"]
        for key in ("latency_p50", "cold_start", "peak_rss", "size", "throughput_b32"):
            assert ratios[key] > 0, (name, key)
        assert r["training"]["ptedge_fp32"]["samples_per_s"] > 0
        assert r["training"]["peft"]["samples_per_s"] > 0
        assert set(r["runtime_overhead"]) == {"ptedge_fp32", "ptedge_int8"}
        assert 0 < r["int8"]["size_fraction_of_fp32"] < 1
    minilm = data["models"]["minilm"]
    for s in ("ptedge_int4", "ptedge_int8_dynamic"):  # new int4, the previous int8 recipe
        assert minilm["systems"][s]["latency_b1_alone_ms"]["p50"] > 0
        assert minilm["quantized"][s]["peft_over_p50"] > 0
    # quick mode's guard scores 16 records, too few to see a loss of 1 point: not static
    assert minilm["quantized"]["ptedge_int8"]["recipe"] == "weight-only"
    assert minilm["quantized"]["ptedge_int8_dynamic"]["recipe"] == "all"
    overhead = minilm["prompt_overhead"]
    assert set(overhead) == {"fp32", "int8"}  # quick: MiniLM only
    for po in overhead.values():
        assert po["aa_b1_ms"]["p50"] > 0  # the A/A control ran
        graph = po["same_graph"]  # the fused table has 6 more rows, nothing else differs
        assert graph["ops_equal"] and graph["nodes"][0] == graph["nodes"][1]
        assert [a[0] - b[0] for a, b in graph["initializer_shapes_differ"].values()] == [6] * len(
            graph["initializer_shapes_differ"]
        )
    full = data["models"]["smollm2"]["full_logits"]
    assert full["output_bytes_b32"]["full_logits"] > full["output_bytes_b32"]["task_graph"]
    assert "PEFT ÷ ptedge int8" in md and "## Goals" in md


def test_bench_quality_quick(tmp_path):
    shared_data("trex", "relations.jsonl")
    shared_data("sst2", "test.tsv")
    shared_data("banking77", "test.csv")
    shared_data("clinc150", "oos_test.csv")
    data, md = _outputs(_bench("bench_quality.py", tmp_path), "quality")
    lama = data["lama"]
    assert len(lama["relations"]) == 2
    methods = ("manual", "ptedge_fp32", "ptedge_int8", "peft")
    for rel in lama["relations"]:
        row = lama["per_relation"][rel]
        for m in methods:
            assert 0 <= row[m]["accuracy"] <= 1 and row[m]["n"] > 0, (rel, m)
    assert set(lama["macro_p_at_1"]) == set(methods)
    pooled = lama["pooled_ece"]
    per = lama["per_relation"]
    assert pooled["n"] == sum(per[r]["ptedge_int8"]["n"] for r in lama["relations"])
    assert 0 <= pooled["ece_after"] <= 1 and 0 <= pooled["ece_floor"] <= 1
    assert set(lama["bundle"]["fp32"]["tasks"]) == set(lama["relations"])  # one bundle
    sst = data["sst2"]
    for m in ("manual_fp32", "manual_int8", "ptedge_fp32", "ptedge_int8", "peft"):
        assert 0 <= sst[m]["accuracy"] <= 1, m
    for task in ("banking77", "clinc150", "sst2-minilm"):
        r = data[task]
        assert "--lr" not in r["command"] and "--pool" not in r["command"]  # defaults only
        assert r["ptedge_run"]["defaults"]["pool"]["value"] == "mean"
        for m in ("ptedge_fp32", "ptedge_int8", "peft", "linear_probe"):
            assert 0 <= r[m]["accuracy"] <= 1, (task, m)
        assert 0 <= r["ptedge_int8"]["ece_after"] <= 1
    assert data["banking77"]["ptedge_run"]["dev_split"]["source"] == "carved"
    assert 0 <= data["clinc150"]["ptedge_int8_oos"]["oos_recall"] <= 1
    for heading in ("## LAMA", "## SST-2", "## all-MiniLM", "## CLINC150", "**macro**"):
        assert heading in md


def test_bench_quality_quick_on_a_users_folder(tmp_path):
    """`--data DIR`: a folder of the user's own files (here 300 SST-2 training sentences and
    the test split, no dev file) runs as the MiniLM tasks do, beside PEFT and the probe."""
    train = shared_data("sst2", "train.tsv").read_text().splitlines()
    data_dir = tmp_path / "reviews"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_text("\n".join(train[:301]) + "\n")
    (data_dir / "test.tsv").write_bytes(shared_data("sst2", "test.tsv").read_bytes())
    extra = ("--data", str(data_dir), "--field", "sentence")
    data, md = _outputs(_bench("bench_quality.py", tmp_path, *extra), "quality")
    r = data["reviews"]
    assert "--lr" not in r["command"] and "{sentence}" in r["command"]
    for m in ("ptedge_fp32", "ptedge_int8", "peft", "linear_probe"):
        assert 0 <= r[m]["accuracy"] <= 1, m
    assert r["ptedge_run"]["dev_split"]["source"] == "carved"
    assert "| reviews (n=40)" in md and "lama" not in data
