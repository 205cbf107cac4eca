"""Manifests: the run folder's ``ptedge.json`` as a dataclass, with JSON round-trip.

Torch-free. A run manifest holds everything needed to rebuild the trained model next
to its weight files (backbone path and hash, template, head, labels, seed, versions).
The bundle manifest is a plain dict built by ``ptedge.export`` and checked by
``ptedge.runtime``; only its format version and file name live here.

Not responsible for: reading weights, loading backbones, validating data.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RUN_MANIFEST = "ptedge.json"
RUN_FORMAT_VERSION = 1
BUNDLE_MANIFEST = "ptedge.json"
BUNDLE_FORMAT_VERSION = 1


@dataclass
class RunConfig:
    """What ``ptedge train`` was asked to do and what it needs to rebuild the model."""

    model: str  # backbone folder (absolute path)
    template: str  # the prompt template, ptedge DSL
    head: str  # lm | linear | generate
    encoder: str = "lstm"  # lstm | mlp | none: how pseudo-token embeddings are produced
    label_field: str = "label"  # record field holding the label / target text
    labels: list[str] | None = None  # class names; None = open vocabulary or generation
    verbalizer: dict[str, str] | None = None  # label -> answer word (lm head)
    pool: str = "slot"  # linear head input: hidden state at the slot, mean, or the pooler
    layout: str = "ptedge"  # ptedge | peft: [P:n] before the specials, [MASK] optional
    max_length: int = 128  # tokens, template included; only field text is truncated
    n_pseudo: int = 0  # pseudo tokens in the template
    vocab_size: int = 0  # rows of the backbone's word embedding (V); pseudo ids start here
    hidden_size: int = 0  # backbone hidden size H
    causal: bool = False  # the backbone is a causal LM (answer = next token)
    eos_id: int | None = None  # end-of-sequence id (generation stops there)
    model_sha256: str = ""  # hash of the backbone's config and weights
    seed: int = 0
    steps: int = 0  # optimisation steps taken
    batch_size: int = 16
    lr: float = 3e-3
    head_lr: float | None = None
    train_file: str = ""
    dev_file: str | None = None  # absolute, or relative to the run folder (a carved split)
    dev_split: dict | None = None  # where dev came from: given, carved from train, none
    defaults: dict = field(default_factory=dict)  # values ptedge chose, each with its reason
    best: dict = field(default_factory=dict)  # dev metrics of the kept prompt
    versions: dict = field(default_factory=dict)  # ptedge, torch, transformers
    format_version: int = RUN_FORMAT_VERSION

    def save(self, run_dir: str | Path) -> None:
        write_json_atomic(Path(run_dir) / RUN_MANIFEST, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / RUN_MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no {RUN_MANIFEST})")
        data = read_json(path)
        if data.get("format_version") != RUN_FORMAT_VERSION:
            raise ValueError(
                f"{path}: run format version {data.get('format_version')!r}, "
                f"this ptedge reads {RUN_FORMAT_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if cfg.dev_file and not Path(cfg.dev_file).is_absolute():
            cfg.dev_file = str((Path(run_dir) / cfg.dev_file).resolve())
        return cfg


def read_json(path: str | Path) -> dict:
    """Read a JSON object; a broken file raises ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON (sorted keys, indented) via a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
