"""Training repeats on the real MiniLM with two threads: the same `ptedge train` command
writes the same run folder, byte for byte (all but timing.jsonl), and a run killed with
SIGKILL and resumed with --resume writes the uninterrupted run's folder.

Slow (about a minute): three short runs and a killed one, each in its own process, as a
user runs them. Few steps and a small batch: each step of the old code had a race
(multi-threaded index backward), so a dozen steps tell repeatable from not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_data

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY, KILL_AT = 12, 5, 9  # killed inside step 9, after a dev row at step 8
THREADS = "2"
TIMING = "timing.jsonl"  # wall-clock figures: the one file that may differ

KILLER = """
import os, signal, sys
from ptedge import train as t
from ptedge.cli import main
calls, real = 0, t.Job.loss
def loss(self, *a, **k):
    global calls
    calls += 1
    if calls == {kill}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **k)
t.Job.loss = loss
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(BANKING77 train file, a 48-record dev file)."""
    train = shared_data("banking77", "train.csv")
    dev = tmp_path_factory.mktemp("data") / "dev48.csv"
    lines = shared_data("banking77", "test.csv").read_text().splitlines(keepends=True)
    dev.write_text("".join(lines[:49]))
    return train, dev


def _train(data, out: Path, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
    from ptedge.backbones import fetch

    train, dev = data
    args = ["train", "--model", str(fetch("minilm-l6")), "--train", str(train)]
    args += ["--dev", str(dev), "--label-field", "category", "--head", "linear"]
    args += ["--template", "[P:2] {text} [P:2] [MASK]", "--steps", str(STEPS)]
    args += ["--batch-size", "8", "--seed", "3", "--eval-every", "4"]
    args += ["--save-every", str(SAVE_EVERY), "--out", str(out), *extra]
    env = os.environ | {"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    head = ["-c", script] if script else ["-m", "ptedge.cli"]
    return subprocess.run(
        [sys.executable, *head, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def _folder(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != TIMING}


def _same_folders(a: Path, b: Path) -> None:
    fa, fb = _folder(a), _folder(b)
    assert sorted(fa) == sorted(fb)
    assert {"prompt_encoder.safetensors", "head.safetensors", "metrics.jsonl"} <= set(fa)
    assert [name for name in fa if fa[name] != fb[name]] == []


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "whole"
    proc = _train(data, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / TIMING).is_file()
    return out


def test_same_command_same_run_folder_two_threads(data, whole, tmp_path):
    again = tmp_path / "again"
    proc = _train(data, again)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_folders(whole, again)


def test_sigkill_then_resume_ends_bit_identical(data, whole, tmp_path):
    run = tmp_path / "killed"
    proc = _train(data, run, script=KILLER.replace("{kill}", str(KILL_AT)))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "checkpoint" / "state.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] > SAVE_EVERY  # logged after the checkpoint: logged again later

    proc = _train(data, run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_folders(whole, run)
