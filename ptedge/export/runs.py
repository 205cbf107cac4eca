"""Loading trained runs for export: one shared backbone, the runs' models and templates.

``load_runs`` rebuilds each run folder's training-time model on one backbone and lays
the tasks' pseudo ids out one after another (task t's prompt starts at ``V + offset``).
A run whose head was also fitted on its carved dev records comes with the fit dev judged
in place (``head.without_dev.safetensors``), and its shipped head in ``final_head``: every
check on dev records is made without them, and ``ptedge.export.final_heads`` swaps the
shipped head in at the end;
``parity_records`` picks the real records every export check is run on.

Not responsible for: fusing (``ptedge.fuse``), ONNX, checks, bundle files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ptedge.config import RunConfig
from ptedge.data import read_records
from ptedge.fuse import FusedTask
from ptedge.model import HEAD_WITHOUT_DEV_FILE, build_for_run, load_backbone
from ptedge.template import record_fields, with_pseudo_base

PARITY_RECORDS = 32  # real records compared at export


@dataclass
class LoadedRun:
    name: str
    cfg: RunConfig
    task: FusedTask
    tok: object
    compiled: dict  # compiled template with the bundle's pseudo base
    final_head: dict | None = None  # the head the bundle ships, when not the one loaded


def load_runs(run_dirs: list[str]) -> tuple[list[LoadedRun], torch.nn.Module]:
    """Load runs sharing one backbone; pseudo ids are laid out one task after another."""
    cfgs = [RunConfig.load(d) for d in run_dirs]
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"task names (run folder names) must be unique: {names}")
    for d, c in zip(run_dirs[1:], cfgs[1:], strict=True):
        if c.model_sha256 != cfgs[0].model_sha256:
            raise ValueError(f"{d}: trained on another backbone than {run_dirs[0]}")
        if c.head == "generate":
            raise ValueError(f"{d}: generation runs cannot share a bundle with other tasks")
    backbone = load_backbone(cfgs[0].model)
    loaded, offset = [], 0
    for d, name, cfg in zip(run_dirs, names, cfgs, strict=True):
        model, tok, compiled, _ = build_for_run(cfg, backbone)
        model.load_weights(d)
        model.eval()
        final = _judge_without_dev(model, Path(d))
        compiled = with_pseudo_base(compiled, cfg.vocab_size + offset)
        loaded.append(LoadedRun(name, cfg, FusedTask(name, model, offset), tok, compiled, final))
        offset += cfg.n_pseudo
    return loaded, backbone


def _judge_without_dev(model, run_dir: Path) -> dict | None:
    """Put the head fitted without the dev records in place, if the run has one; returns
    the run's own head (state dict), which the bundle ships, or None."""
    path = run_dir / HEAD_WITHOUT_DEV_FILE
    if model.head is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    final = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.head.load_state_dict(load_file(str(path)))
    return final


def parity_records(run: LoadedRun, eval_file: str | None, n: int = PARITY_RECORDS) -> list[dict]:
    """Up to n real records of the run's data with the template's fields."""
    path = eval_file or run.cfg.dev_file or run.cfg.train_file
    if not path:
        raise ValueError(f"run {run.name} has no data file for the parity check; use --eval FILE")
    recs = read_records(path)
    need = record_fields(run.compiled)
    usable = [r for r in recs if all(r.get(f) is not None for f in need)]
    return random.Random(0).sample(usable, min(n, len(usable)))
