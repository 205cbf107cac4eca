"""Resumable training checkpoints, written atomically, without pickle.

A checkpoint is a folder with ``tensors.safetensors`` (every tensor of the state) and
``state.json`` (everything else, with each tensor replaced by a reference), so that a
checkpoint never executes code when read. ``save`` writes a new folder and swaps it in
with renames; a kill at any moment leaves the previous checkpoint readable.

Not responsible for: what goes into the state (``ptedge.train``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"
_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"


def _flatten(obj, tensors: dict[str, torch.Tensor]):
    """A JSON-able skeleton of ``obj``; tensors go to ``tensors`` under fresh keys."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {_DICT: [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    return obj


def _restore(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _DICT in obj:
            return {k: _restore(v, tensors) for k, v in obj[_DICT]}
        if _TUPLE in obj:
            return tuple(_restore(v, tensors) for v in obj[_TUPLE])
    if isinstance(obj, list):
        return [_restore(v, tensors) for v in obj]
    return obj


def save(run_dir: Path, state: dict) -> None:
    """Atomically replace ``run_dir/checkpoint`` with ``state``."""
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    old = run_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path) -> dict | None:
    """The latest complete checkpoint of a run folder, or None."""
    from safetensors.torch import load_file

    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        folder = run_dir / name
        if (folder / "state.json").is_file() and (folder / "tensors.safetensors").is_file():
            tensors = load_file(str(folder / "tensors.safetensors"))
            return _restore(json.loads((folder / "state.json").read_text()), tensors)
    return None
