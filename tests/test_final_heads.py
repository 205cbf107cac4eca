"""A head also fitted on the carved dev records: the run saves it and the fit dev judged;
export judges and calibrates with the latter, then ships the former (ptedge.export.final_heads)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ptedge.data import read_records
from ptedge.export import ExportArgs, export
from ptedge.export.parity import PARITY_ATOL
from ptedge.model import HEAD_FILE, HEAD_WITHOUT_DEV_FILE
from ptedge.runtime import Predictor


def _train(tiny, data, out, **kw):
    from test_defaults import _train as train_tiny

    return train_tiny(tiny, data, out, **({"steps": 8} | kw))


def test_a_carved_dev_split_joins_the_shipped_heads_fit(tiny, intents, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = _train(tiny, intents, run)
    assert cfg.dev_split["source"] == "carved"
    assert cfg.defaults["head_refit"]["value"] == "refit"
    assert cfg.defaults["head_data"]["value"] == "training and dev records"
    shipped, judged = load_file(run / HEAD_FILE), load_file(run / HEAD_WITHOUT_DEV_FILE)
    assert set(shipped) == set(judged) == {"weight", "bias"}
    assert not torch.equal(shipped["weight"], judged["weight"])


def test_a_given_dev_split_stays_out_of_the_head(tiny, intents, tmp_path):
    run = tmp_path / "run"
    cfg = _train(tiny, intents, run, dev=str(intents))
    assert cfg.defaults["head_refit"]["value"] == "refit"
    assert "head_data" not in cfg.defaults and not (run / HEAD_WITHOUT_DEV_FILE).exists()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_export_calibrates_without_dev_and_ships_the_head_with_it(
    tiny, intents, tmp_path, quantize
):
    from ptedge.model import load_run
    from ptedge.train import Job, predict_ids

    run = tmp_path / "run"
    _train(tiny, intents, run)
    # the same run as if the head dev judged were its own
    judged = tmp_path / "judged"
    shutil.copytree(run, judged)
    (judged / HEAD_WITHOUT_DEV_FILE).replace(judged / HEAD_FILE)

    def bundle(src):
        out = tmp_path / f"b-{src.name}"
        export(ExportArgs(runs=[str(src)], out=str(out), quantize=quantize, max_drop=100.0))
        return out, json.loads((out / "ptedge.json").read_text())["tasks"][src.name]

    (b, task), (bj, task_j) = bundle(run), bundle(judged)
    # calibration and the guard saw the same scores: the head fitted without dev
    t, tj = task["calibration"]["temperature"], task_j["calibration"]["temperature"]
    assert t == pytest.approx(tj, rel=1e-5)
    assert task["head_fit"]["fit"] == "training and dev records"
    assert task["head_fit"]["check"]["max_abs_diff"] <= task["head_fit"]["check"]["tolerance"]
    assert "head_fit" not in task_j
    from click.testing import CliRunner

    from ptedge.cli import main

    info = CliRunner().invoke(main, ["info", str(b)]).output
    assert "head       run: fitted on training and dev records; swapped in" in info
    # the bundle ships the run's own head: it scores as PyTorch's run does
    records = list(read_records(intents))[:60]
    scores, _ = Predictor(b).scores(records, batch_size=8)
    judged_scores, _ = Predictor(bj).scores(records, batch_size=8)
    assert np.abs(scores - judged_scores).max() > 1e-3
    if quantize is None:
        cfg, model, tok, compiled, _ = load_run(run)
        assert scores.argmax(-1).tolist() == predict_ids(Job(cfg, model, tok, compiled), records)
        from ptedge.export.runs import load_runs
        from ptedge.export.scoring import unfused_scores

        (loaded,), _ = load_runs([str(run)])
        loaded.task.model.head.load_state_dict(loaded.final_head)
        ref = unfused_scores(loaded, records)
        assert np.abs(ref - scores).max() <= PARITY_ATOL


def test_a_head_not_found_in_the_graph_stays_the_judged_one(tiny, intents, tmp_path, monkeypatch):
    from ptedge.export import final_heads

    run = tmp_path / "run"
    _train(tiny, intents, run)
    monkeypatch.setattr(final_heads, "_matches", lambda model, old: [])
    out = tmp_path / "b"
    export(ExportArgs(runs=[str(run)], out=str(out)))
    task = json.loads((out / "ptedge.json").read_text())["tasks"]["run"]
    assert task["head_fit"]["fit"] == "training records (dev records not added)"
    assert "0 and 0 found" in task["head_fit"]["why"]
    # the bundle scores as the judged head does
    from ptedge.export.runs import load_runs
    from ptedge.export.scoring import unfused_scores

    (loaded,), _ = load_runs([str(run)])
    records = list(read_records(intents))[:20]
    scores, _ = Predictor(out).scores(records, batch_size=8)
    assert np.abs(unfused_scores(loaded, records) - scores).max() <= PARITY_ATOL
