"""Checking a command's data before any work starts: each file against what its task needs.

Every command that reads labelled or templated records (train, eval, export,
import-peft) calls these first, so that a missing file, a missing field, an empty label
or a label the task does not know stops it with one line naming the file, the line and
the field, before a backbone or a model is loaded and before any output folder exists.
What a task needs comes from a run's ``ptedge.json`` or a bundle's task entry.

Torch-free. Not responsible for: parsing files (``ptedge.data``), encoding records or
mapping labels to targets (``ptedge.template``, ``ptedge.targets``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ptedge.config import RunConfig
from ptedge.data import Records, labels_of, read_records, require_fields
from ptedge.targets import class_targets
from ptedge.template import Field, parse, record_fields


def check_records(
    records: Records,
    fields: Iterable[str],
    *,
    label_field: str | None = None,
    labels: Sequence[str] | None = None,
    needed_by: str | None = None,
) -> None:
    """Every record has ``fields`` (which ``needed_by`` reads); with ``label_field``, a
    non-empty label there, and one of ``labels`` when given. Raises ``DataError`` (file,
    line, field) at the first miss."""
    require_fields(records, fields, reason=needed_by and f"{needed_by} reads it")
    if label_field is not None and labels is None:
        labels_of(records, label_field)
    elif label_field is not None:
        class_targets(records, label_field, list(labels))


def run_fields(cfg: RunConfig) -> list[str]:
    """The record fields a run's template reads."""
    names = [s.name for s in parse(cfg.template, need_slot=False) if isinstance(s, Field)]
    return list(dict.fromkeys(names))


def check_run_data(cfg: RunConfig, path: str | Path, *, run: str, labelled: bool = True) -> Records:
    """Read ``path`` and check it against run ``run``: its template's fields and, when
    ``labelled``, its label field (and its labels, for classifiers)."""
    records = read_records(path)
    check_records(
        records,
        run_fields(cfg),
        label_field=cfg.label_field if labelled else None,
        labels=cfg.labels if labelled and cfg.head != "generate" else None,
        needed_by=f"the template of run {run!r}",
    )
    return records


def check_task_records(spec: dict, records: Records, *, task: str, labelled: bool) -> None:
    """Check records against a bundle task entry (``ptedge.json`` ``tasks[task]``)."""
    check_records(
        records,
        record_fields(spec["template"]),
        label_field=spec["label_field"] if labelled else None,
        labels=spec["labels"] if labelled and spec["kind"] == "classify" else None,
        needed_by=f"the template of task {task!r}",
    )


def check_export_data(run_dirs: Sequence[str], eval_file: str | None, *, labelled: bool) -> None:
    """Each run's export data (``--eval``, else its dev, else its train file) has the
    fields its template reads and, when ``labelled`` (the int8 guard), its labels."""
    for d in run_dirs:
        cfg = RunConfig.load(d)
        name = Path(d).resolve().name
        path = eval_file or cfg.dev_file or cfg.train_file
        if not path:
            raise ValueError(f"run {name} has no data file for the parity check; use --eval FILE")
        check_run_data(cfg, path, run=name, labelled=labelled)
