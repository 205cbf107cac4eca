"""Crash-safe training: a run killed with SIGKILL and resumed ends where an
uninterrupted run ends, to the bit (weights and metrics.jsonl), and metrics.jsonl
survives the kill."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

STEPS, SAVE_EVERY, KILL_AT = 30, 10, 25


def _args(model, data, out, **kw):
    from ptedge.train import TrainArgs

    return TrainArgs(
        model=str(model),
        train=str(data),
        dev=str(data),
        out=str(out),
        template="[P:2] {sentence} [P] [MASK]",
        head="linear",
        pool="mean",
        steps=STEPS,
        batch_size=4,
        lr=1e-2,
        eval_every=7,
        log_every=6,  # the checkpoint at step 20 holds two steps' loss not yet logged
        save_every=SAVE_EVERY,
        **kw,
    )


def _weights(run):
    from safetensors.torch import load_file

    return {
        **load_file(str(run / "prompt_encoder.safetensors")),
        **load_file(str(run / "head.safetensors")),
    }


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from ptedge import train as t
    from ptedge.train import TrainArgs, train
    calls = 0
    real = t.Job.loss
    def loss(self, *a, **k):
        global calls
        calls += 1
        if calls == {kill}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)
    t.Job.loss = loss
    train(TrainArgs(**{args}), progress=False)
""")


def test_sigkill_then_resume_matches_uninterrupted(tiny, sentiment_file, tmp_path):
    from ptedge.train import train

    model = tiny("bert")
    train(_args(model, sentiment_file, tmp_path / "whole"), progress=False)

    killed = tmp_path / "killed"
    a = _args(model, sentiment_file, killed)
    fields = {k: getattr(a, k) for k in a.__dataclass_fields__}
    script = KILLER.replace("{kill}", str(KILL_AT)).replace("{args}", repr(fields))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoint" / "state.json").is_file()
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows and 20 < rows[-1]["step"] < KILL_AT  # logged after the checkpoint, kept

    train(_args(model, sentiment_file, killed, resume=True), progress=False)
    whole, resumed = _weights(tmp_path / "whole"), _weights(killed)
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    for name in ("metrics.jsonl", "ptedge.json"):  # no row logged twice, no loss lost
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not (killed / "checkpoint").exists()  # removed once finished


def test_resume_without_checkpoint_starts_fresh(tiny, sentiment_file, tmp_path):
    from ptedge.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    train(_args(tiny("bert"), sentiment_file, out, resume=True), progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "ptedge.json").is_file()


def test_non_empty_out_without_resume_is_refused(tiny, sentiment_file, tmp_path):
    from ptedge.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        train(_args(tiny("bert"), sentiment_file, out), progress=False)
    assert (out / "keep.txt").read_text() == "x"
