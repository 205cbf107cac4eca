"""Calibration and out-of-scope rejection, fitted at export on the model that ships.

For each task with labels (or open vocabulary), the shipped graph (fp32, int8 or fp16:
whatever the bundle will run) scores the task's dev records; a temperature is fitted on
them (``ptedge.calibration``), and with ``--reject FILE`` a probability threshold is
chosen that keeps in-scope accuracy within ``--reject-max-drop`` points (the dev loss plus
its one-sided 95% margin, so that new records stay within it too), at the
rejection temperature that rejects most of FILE's records (``rejection_rule``), or, where
that rejects more, a threshold on the relative Mahalanobis distance of the scores (fitted
on the scores of the run's own training records) or on the two combined. Both go into
the task's manifest entry, which every client applies (``docs/bundle-format.md`` §7).

Dev records: ``--eval FILE`` if given, else the run's dev split (given at training, or
carved from --train). A run trained with ``--dev none`` and exported without ``--eval``
has no held-out records, and its scores are left uncalibrated (fitting on training
records would make them look surer than they are).

Not responsible for: the arithmetic (``ptedge.calibration``), writing the manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ptedge import calibration, defaults
from ptedge.data import DataError, Records, labels_of, read_records, require_fields
from ptedge.export.bundle import data_source
from ptedge.export.scoring import onnx_scores
from ptedge.targets import class_targets, vocab_targets
from ptedge.template import record_fields

CALIBRATION_MAX = 2000  # dev records a temperature is fitted on
DISTANCE_MAX = 20000  # training records a rejection distance is fitted on
DISTANCE_CHUNK = 512  # records scored between progress updates
# The distance's three L x L matrices go into the manifest: 1.6 MB at 150 labels, 2.9 MB at
# 200, growing with L^2; beyond this many labels only the top probability is tried.
DISTANCE_MAX_LABELS = 200
BATCH = 32


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dev_file(run, eval_file: str | None) -> str | None:
    """The held-out records a task is calibrated on, or None."""
    return eval_file or run.cfg.dev_file


def scores_of(session, run, records: list[dict]) -> np.ndarray:
    """Scores (N, L|V) of ``records`` from the shipped session, in batches."""
    parts = [
        onnx_scores(session, run, records[i : i + BATCH]) for i in range(0, len(records), BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _spread(recs: Records, cap: int) -> Records:
    """At most ``cap`` of ``recs``, evenly spread over the file."""
    if len(recs) <= cap:
        return recs
    idx = np.linspace(0, len(recs) - 1, cap).astype(int)
    return Records(recs.path, [recs[i] for i in idx], [recs.lines[i] for i in idx])


def _labelled(run, path: str) -> tuple[list[dict], np.ndarray]:
    """Up to CALIBRATION_MAX records of ``path`` spread over the file, with gold indices
    (open-vocabulary records whose answer is not one token are left out)."""
    recs = _spread(read_records(path), CALIBRATION_MAX)
    if run.cfg.labels is None:
        targets = vocab_targets(recs, run.cfg.label_field, run.compiled, run.tok)
    else:
        targets = class_targets(recs, run.cfg.label_field, run.cfg.labels)
    keep = [i for i, t in enumerate(targets) if t is not None]
    return [recs[i] for i in keep], np.array([targets[i] for i in keep], dtype=np.int64)


def check_inputs(runs, eval_file: str | None, reject_file: str | None) -> None:
    """Before any work: the files exist and hold the fields the tasks need."""
    for path, what in ((eval_file, "--eval"), (reject_file, "--reject")):
        if path is None:
            continue
        recs = read_records(path)
        for run in runs:
            need = record_fields(run.compiled)
            if what == "--eval":
                need = need + [run.cfg.label_field]
            require_fields(recs, need, reason=f"task {run.name} needs it")
    if reject_file and not any(r.cfg.labels for r in runs):
        raise ValueError("--reject needs a task with labels (classification)")


def calibrate(session, runs, eval_file: str | None, reject_file: str | None, max_drop: float):
    """Per task name: ``{"calibration": ..., "reject": ...}`` manifest entries (None where
    not fitted), from the shipped ``session``."""
    entries = {}
    for run in runs:
        entry = {"calibration": None, "reject": None}
        entries[run.name] = entry
        path = dev_file(run, eval_file)
        if run.cfg.head == "generate":
            continue
        if path is None:
            _log(
                f"calibration {run.name}: the run has no dev split (give --eval FILE of "
                "held-out records): scores left uncalibrated"
            )
            continue
        recs, targets = _labelled(run, path)
        if not recs:  # e.g. LAMA facts whose objects are all several tokens long
            _log(
                f"calibration {run.name}: no record of {Path(path).name} has a label the task "
                "can score (a single token): scores left uncalibrated"
            )
            continue
        scores = scores_of(session, run, recs)
        t = calibration.fit_temperature(scores, targets)
        raw, cal = calibration.probabilities(scores), calibration.probabilities(scores, t)
        correct = cal.argmax(-1) == targets
        entry["calibration"] = {
            "temperature": t,
            "data": {**data_source(path), "n": len(recs)},
            "ece_before": calibration.ece(raw.max(-1), correct),
            "ece_after": calibration.ece(cal.max(-1), correct),
            "nll_before": calibration.nll(scores, targets),
            "nll_after": calibration.nll(scores, targets, t),
        }
        c = entry["calibration"]
        _log(
            f"calibration {run.name}: temperature {t:.3f} on {len(recs)} dev records, "
            f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}"
        )
        if reject_file and run.cfg.labels:
            entry["reject"] = _reject(session, run, reject_file, scores, correct, t, max_drop)
    return entries


def training_records(run) -> Records:
    """The records the run's head was trained on: its ``--train`` file less the dev split
    carved from it (rebuilt as ``ptedge train`` carved it), at most DISTANCE_MAX."""
    cfg = run.cfg
    recs = read_records(cfg.train_file)
    split = cfg.dev_split or {}
    if split.get("source") == "carved":
        strata = labels_of(recs, cfg.label_field) if split.get("stratified_by") else None
        keep, _ = defaults.carve_dev(len(recs), split["seed"], strata)
        recs = Records(recs.path, [recs[i] for i in keep], [recs.lines[i] for i in keep])
    return _spread(recs, DISTANCE_MAX)


def _distance(session, run) -> dict | None:
    """The rejection distance fitted on the scores of the run's training records, or None
    (said on stderr) when they cannot be read or the task has too many labels."""
    if len(run.cfg.labels) > DISTANCE_MAX_LABELS:
        _log(
            f"rejection {run.name}: {len(run.cfg.labels)} labels, more than "
            f"{DISTANCE_MAX_LABELS}: the distance is not tried (its matrices would swell "
            "the manifest); probability only"
        )
        return None
    try:
        recs = training_records(run)
        targets = np.array(class_targets(recs, run.cfg.label_field, run.cfg.labels))
    except (OSError, DataError, ValueError) as e:
        _log(f"rejection {run.name}: training records unreadable ({e}): probability only")
        return None
    from tqdm import tqdm

    parts = []
    with tqdm(
        total=len(recs), desc=f"rejection {run.name}: training records", unit="rec", disable=None
    ) as bar:
        for i in range(0, len(recs), DISTANCE_CHUNK):
            parts.append(scores_of(session, run, list(recs[i : i + DISTANCE_CHUNK])))
            bar.update(len(parts[-1]))
    _log(f"rejection {run.name}: distance fitted on the scores of {len(recs)} training records")
    return calibration.distance_model(np.concatenate(parts), targets)


def _reject(session, run, reject_file: str, scores, correct, temperature: float, max_drop: float):
    """The rejection rule (``calibration.in_scope``: top probability at a temperature,
    distance, or both) and its threshold on in-scope dev scores (N, L), and the
    out-of-scope recall on the ``--reject`` records."""
    oos = read_records(reject_file)
    distance = _distance(session, run)
    rule = calibration.rejection_rule(
        scores, correct, scores_of(session, run, oos), temperature, max_drop, distance
    )
    dropped = ("recall", "accuracy_kept", "loss_bound", "tried")  # reported below instead
    chosen = {k: v for k, v in rule.items() if k not in dropped}
    _log(
        f"rejection {run.name}: {calibration.describe_rule(rule)} below "
        f"{rule['threshold']:.4g}; dev in-scope accuracy {correct.mean():.4f} -> "
        f"{rule['accuracy_kept']:.4f} (upper bound on the loss {rule['loss_bound']:.2f} "
        f"points, at most {max_drop:g}), out-of-scope recall {rule['recall']:.4f} on "
        f"{len(oos)} records of {Path(reject_file).name}"
    )
    return chosen | {
        "max_drop_points": max_drop,
        "dev": {
            "n": len(correct),
            "accuracy": float(correct.mean()),
            "accuracy_kept": rule["accuracy_kept"],
            "loss_bound_points": rule["loss_bound"],
        },
        "out_of_scope": {**data_source(reject_file), "n": len(oos), "recall": rule["recall"]},
        "tried": rule["tried"],
    }
