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

from ptedge.calibration import can_reject
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
    """Check records against a bundle task entry (``ptedge.json`` ``tasks[task]``).

    A task with a rejection threshold accepts labels outside its own: those records are
    out of scope, and evaluation counts whether they are rejected."""
    rejects = can_reject(spec)
    check_records(
        records,
        record_fields(spec["template"]),
        label_field=spec["label_field"] if labelled else None,
        labels=spec["labels"] if labelled and spec["kind"] == "classify" and not rejects else None,
        needed_by=f"the template of task {task!r}",
    )


def check_export_data(
    run_dirs: Sequence[str],
    eval_file: str | None,
    *,
    quantize: bool,
    reject_file: str | None = None,
) -> None:
    """Each run's data as ``ptedge export`` will read it: the parity records (``--eval``,
    else the run's dev file, else its train file) have the template's fields; the records
    calibration scores (``--eval``, else the dev file; not for ``generate``) and, with
    ``quantize``, the int8 guard's (as parity) also labels the task knows; ``--reject``
    records have the template's fields."""
    for d in run_dirs:
        cfg = RunConfig.load(d)
        name = Path(d).resolve().name
        parity = eval_file or cfg.dev_file or cfg.train_file
        if not parity:
            raise ValueError(f"run {name} has no data file for the parity check; use --eval FILE")
        labelled = {parity: quantize}  # path -> whether its labels are read
        calibration = None if cfg.head == "generate" else eval_file or cfg.dev_file
        if calibration:
            labelled[calibration] = True
        if reject_file:
            labelled.setdefault(reject_file, False)
        for path, labels in labelled.items():
            check_run_data(cfg, path, run=name, labelled=labels)
