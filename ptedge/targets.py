"""Gold answers: turn records' label field into target indices, and score predictions.

Torch-free, shared by training, ``ptedge eval`` on runs and on bundles, so that both
count the same records. A classification target is the label's index in the task's
label list; an open-vocabulary target (LAMA) is the token id of the label text as it
appears at the slot, or None when it is not a single token (skipped and counted).

Not responsible for: encoding inputs (``ptedge.template``), running models.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from ptedge.data import DataError, Records, labels_of
from ptedge.template import answer_ids


def class_targets(
    records: Records | list[dict], label_field: str, labels: list[str], unknown_ok: bool = False
) -> list[int]:
    """Index of each record's label in ``labels``; an unknown label is a DataError, or -1
    (out of scope) with ``unknown_ok``."""
    index = {lab: i for i, lab in enumerate(labels)}
    out: list[int] = []
    lines = getattr(records, "lines", None) or range(1, len(records) + 1)
    path = getattr(records, "path", "<records>")
    for line, lab in zip(lines, labels_of(records, label_field), strict=True):
        if lab not in index and unknown_ok:
            out.append(-1)
            continue
        if lab not in index:
            shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
            raise DataError(
                f"{path}:{line}: label {lab!r} in field {label_field!r} is not one of "
                f"the task's labels ({shown})"
            )
        out.append(index[lab])
    return out


def vocab_targets(
    records: Records, label_field: str, compiled: dict, tok: Tokenizer
) -> list[int | None]:
    """Token id of each record's label text at the slot, None if not a single token."""
    return answer_ids(compiled, tok, labels_of(records, label_field), strict=False)


def accuracy(predicted: list[int], targets: list[int | None]) -> dict:
    """{"accuracy", "n", "skipped"} over records whose target is not None."""
    pairs = [(p, t) for p, t in zip(predicted, targets, strict=True) if t is not None]
    n = len(pairs)
    correct = sum(p == t for p, t in pairs)
    return {"accuracy": correct / n if n else 0.0, "n": n, "skipped": len(targets) - n}


def exact_match(texts: list[str], labels: list[str]) -> dict:
    """{"accuracy", "n", "skipped"}: generated text equal to the label, whitespace-stripped."""
    n = len(labels)
    correct = sum(t.strip() == g.strip() for t, g in zip(texts, labels, strict=True))
    return {"accuracy": correct / n if n else 0.0, "n": n, "skipped": 0}
