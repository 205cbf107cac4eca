"""tools/bench_lama_calibration.py: the README's LAMA command, and the temperature grid its
analysis reads (synthetic scores with a known temperature; the real runs are the study's)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_lama_calibration as lc  # noqa: E402

from ptedge.calibration import probabilities  # noqa: E402


def test_the_command_is_the_readmes_with_the_relations_files_and_no_tuning_flags():
    flags = lc.train_flags(Path("/trex"), "P37", Path("/m"))
    assert flags[flags.index("--train") + 1] == "/trex/train/P37.jsonl"
    assert flags[flags.index("--dev") + 1] == "/trex/dev/P37.jsonl"
    assert flags[flags.index("--template") + 1] == "[P:3] {sub_label} [P:3] [MASK]"
    assert not {"--lr", "--steps", "--batch-size", "--head"} & set(flags)


def _drawn(temperature: float, n: int = 4000, v: int = 30, seed: int = 0):
    """Scores (n, v) and gold ids drawn from softmax(scores / temperature)."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, v)) * 3
    p = probabilities(scores, temperature)
    gold = np.array([rng.choice(v, p=row) for row in p])
    return scores, gold


def test_grid_stats_are_the_softmax_at_each_temperature():
    scores, gold = _drawn(1.0, n=50)
    s = lc.grid_stats(scores, gold)
    k = int(np.argmin(np.abs(lc.GRID - 2.0)))
    p = probabilities(scores, lc.GRID[k])
    np.testing.assert_allclose(s["conf"][:, k], p.max(-1), rtol=1e-9)
    np.testing.assert_allclose(s["logp"][:, k], np.log(p[np.arange(50), gold]), rtol=1e-9)
    assert (s["ok"] == (scores.argmax(-1) == gold)).all()


def test_both_fits_find_the_temperature_the_labels_were_drawn_at():
    scores, gold = _drawn(2.0)
    s = lc.grid_stats(scores, gold)
    assert 1.7 < lc.nll_fit([s]) < 2.35
    assert 1.5 < lc.top_label_fit(s) < 2.6
    # and the ECE at the fitted temperature is near its floor, far below the raw one
    fitted = lc.ece_row([(s, lc.nll_fit([s]))])
    assert fitted["ece"] < 0.03 < lc.ece_row([(s, 1.0)])["ece"]


def test_dev_crossfit_scores_every_rule_on_held_out_halves():
    dev = {}
    for k in range(3):  # three "relations", labels drawn at T = 2
        scores, gold = _drawn(2.0, n=600, seed=k)
        dev[f"P{k}"] = lc.grid_stats(scores, gold)
    res = lc.dev_crossfit(dev)
    assert set(res) == set(lc.FITS)
    assert all(row["n"] == 1800 for row in res.values())
    fitted = res["one for all relations, NLL"]["ece"]
    assert fitted < res["raw (T = 1)"]["ece"] / 2


def test_the_report_says_what_the_int8_guard_measured():
    def task(n, fp32, q, lost, gained, p):
        return {
            "data": {"n": n},
            "fp32_accuracy": fp32,
            "quantized_accuracy": q,
            "lost": lost,
            "gained": gained,
            "p": p,
        }

    q = {
        "recipe": "int8-token",
        "guard": {
            "P1": task(11, 0.5, 0.5 - 1 / 11, 1, 0, 0.5),
            "P2": task(80, 0.5, 0.5, 2, 2, 0.69),
        },
        "guard_all_tasks": {"points": 1.1, "lost": 3, "gained": 2, "p": 0.5},
    }
    line = lc._guard_lines(q)[0]
    assert "`int8-token`" in line and "over all 91 scorable dev facts +1.10 points" in line
    assert "1 relations past 1 point alone" in line and "P1 1/0 of 11 (p 0.50)" in line
    assert "P2" not in line
    assert lc._guard_lines(None) == []
