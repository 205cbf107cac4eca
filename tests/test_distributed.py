"""Data-parallel training under torchrun: two CPU processes (gloo) train the same
model as one process at the same global batch, and only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _train_cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "ptedge",
        "train",
        "--model",
        str(model),
        "--train",
        str(data),
        "--template",
        "[P:2] {sentence} [P] [MASK]",
        "--head",
        "linear",
        "--pool",
        "mean",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--out",
        str(out),
    ]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_processes_match_one(tiny, sentiment_file, tmp_path):
    from safetensors.torch import load_file

    model = tiny("bert")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_train_cmd(model, sentiment_file, one), check=True, env=env, capture_output=True)
    res = subprocess.run(
        [
            str(bindir / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            *_train_cmd(model, sentiment_file, two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["world_size"] == 2 for r in rows)
    for name in ("prompt_encoder.safetensors", "head.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        for k in a:
            assert (a[k] - b[k]).abs().max().item() < 1e-4, (name, k)
