"""Data-parallel training under torchrun and accelerate launch: two CPU processes
(gloo) train the same model as one process at the same global batch, and only rank 0
writes the run."""

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
        "--no-backbone-dropout",  # each rank draws its own masks: equal only without them
        "--out",
        str(out),
    ]


def _launcher(name: str, bindir: Path) -> list[str]:
    """The documented command line prefix of each engine, two CPU processes."""
    if name == "torchrun":
        return [str(bindir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    # --multi_gpu selects accelerate's torch.distributed launcher; without CUDA, ptedge
    # trains on CPU with gloo (accelerate's --cpu would start a single process)
    return [
        str(bindir / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--no_python",
    ]


@pytest.mark.parametrize("engine", ["torchrun", "accelerate"])
def test_two_processes_match_one(engine, tiny, sentiment_file, tmp_path):
    from safetensors.torch import load_file

    bindir = Path(sys.executable).parent
    if not (bindir / engine).exists() and shutil.which(engine) is None:
        pytest.skip(f"{engine} not installed")
    model = tiny("bert")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_train_cmd(model, sentiment_file, one), check=True, env=env, capture_output=True)
    res = subprocess.run(
        [*_launcher(engine, bindir), *_train_cmd(model, sentiment_file, two)],
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


def test_a_group_train_joins_is_destroyed_and_a_callers_is_left(monkeypatch):
    """``_distributed`` destroys the process group it joined, also when training fails (a
    rank that exits with gloo's threads alive can abort in interpreter shutdown), and
    leaves alone a group its caller had joined."""
    import torch.distributed as dist

    from ptedge.train import _distributed

    calls, joined = [], {"yes": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: joined["yes"])
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend: (calls.append(backend), joined.update(yes=True))
    )
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    with pytest.raises(RuntimeError, match="boom"), _distributed("cpu") as (rank, world):
        assert (rank, world) == (1, 2)
        raise RuntimeError("boom")
    assert calls == ["gloo", "destroyed"]
    calls.clear()
    with _distributed("cpu") as (rank, world):  # the caller's group, joined above
        assert (rank, world) == (1, 2)
    assert calls == []
