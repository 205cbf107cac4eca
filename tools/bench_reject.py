"""Which score to threshold for out-of-scope rejection: evidence for
``ptedge.calibration.rejection_rule`` (issue 12).

For a bundle exported from a CLINC150 run, each candidate score is thresholded on the
in-scope dev records (the largest threshold losing at most ``--max-drop`` points of
accuracy, as ``rejection_threshold``) and then scored on the test splits: in-scope
accuracy with the threshold and out-of-scope recall. Candidates: the rule's own (the top
probability at 1, 2, 4, 8 and 16 times the bundle's calibration temperature, the relative
Mahalanobis distance of the scores, fitted on the scores of ``train.csv`` as export fits
it on the run's training records, and the two combined at each temperature), and three it
does not try: the top score (max logit), the energy (T log-sum-exp of scores / T) and the
margin between the two top scores. The ``rule`` row is what export chooses: the candidate
that rejects most of ``oos_dev.csv`` at its dev threshold. Test splits only score; nothing
is chosen on them.

    python tools/bench_reject.py B            # B: an int8 or fp32 bundle of a CLINC150 run
    python tools/bench_reject.py B --query "what is the weather on mars"

``--query TEXT`` (repeatable) adds, for each score, where that query falls among the
in-scope dev records (the share of them it looks less in scope than) and whether the
score's dev threshold rejects it: how far a query is from being rejected, and by which
score.
"""

from __future__ import annotations

import argparse
import sys

import _bench_common as bc
import numpy as np


def _scores(p, name: str, spec: dict, path) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, L) scores of a file's records, and gold ids (None for out-of-scope files)."""
    from ptedge.data import read_records
    from ptedge.targets import class_targets

    recs = read_records(path)
    scores, _ = p.scores(list(recs), name)
    gold = class_targets(recs, spec["label_field"], spec["labels"], unknown_ok=True)
    gold = np.array(gold)
    return np.asarray(scores, dtype=np.float64), None if (gold < 0).all() else gold


def other_scores(t: float) -> dict:
    """Scores the rule does not try, name -> function of (N, L) scores to (N,) confidence
    (higher: in scope): the top score, the energy and the margin of the two top scores."""

    def energy(s):
        z = s / t
        m = z.max(-1)
        return t * (m + np.log(np.exp(z - m[:, None]).sum(-1)))

    def margin(s):
        top2 = np.sort(s, -1)[:, -2:]
        return top2[:, 1] - top2[:, 0]

    return {"max score": lambda s: s.max(-1), "energy": energy, "margin": margin}


def describe(rule: dict, t: float) -> str:
    """A row label for one of ``rejection_rule``'s candidates."""
    at = f", T x {rule['temperature'] / t:g}" if "temperature" in rule else ""
    return {
        "probability": "top probability",
        "distance": "relative Mahalanobis distance",
        "combined": "combined (log top probability and distance)",
    }[rule["score"]] + at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default=str(bc.DATA / "clinc150"), help="CLINC150 folder")
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--query", action="append", default=[], help="a text to place (repeatable)")
    a = ap.parse_args()
    from pathlib import Path

    from ptedge import calibration
    from ptedge.runtime import Predictor

    p = Predictor(a.bundle, threads=1)
    name, spec = next(iter(p.tasks.items()))
    t = float((spec.get("calibration") or {}).get("temperature", 1.0))
    d = Path(a.data)
    dev, gold_dev = _scores(p, name, spec, d / "dev.csv")
    oos_dev, _ = _scores(p, name, spec, d / "oos_dev.csv")
    test, gold_test = _scores(p, name, spec, d / "test.csv")
    oos_test, _ = _scores(p, name, spec, d / "oos_test.csv")
    train, gold_train = _scores(p, name, spec, d / "train.csv")
    distance = calibration.distance_model(train, gold_train)
    ok_dev, ok_test = dev.argmax(-1) == gold_dev, test.argmax(-1) == gold_test
    print(
        f"{a.bundle}: calibration T {t:.3f}; test accuracy {ok_test.mean():.4f}; dev "
        f"threshold at most {a.max_drop:g} points lost"
    )
    print("| score | oos_dev recall | test in scope (lost) | oos_test recall |")
    print("|---|---:|---:|---:|")
    rule = calibration.rejection_rule(dev, ok_dev, oos_dev, t, a.max_drop, distance)
    rows = {
        describe(r, t): lambda s, r=r: calibration.in_scope(s, r | {"distance": distance})
        for r in rule["tried"]
    }
    rows |= other_scores(t)
    rows[f"rule: {describe(rule, t)}"] = rows[describe(rule, t)]
    segments = spec["template"]["segments"]
    text_field = next(seg["field"] for seg in segments if "field" in seg)  # CLINC150: text
    queries, _ = p.scores([{text_field: q} for q in a.query], name) if a.query else (None, None)
    placed = []
    for label, f in rows.items():
        threshold = calibration.rejection_threshold(f(dev), ok_dev, a.max_drop)
        kept = (ok_test & (f(test) >= threshold)).mean()
        print(
            f"| {label} | {(f(oos_dev) < threshold).mean():.3f} | {kept:.4f} "
            f"({100 * (ok_test.mean() - kept):.2f}) | {(f(oos_test) < threshold).mean():.3f} |"
        )
        if queries is not None:
            for q, c in zip(a.query, f(np.asarray(queries, dtype=np.float64)), strict=True):
                below = (f(dev) > c).mean()  # dev records more in scope than the query
                placed.append(
                    f"| {q} | {label} | {below:.3f} | {'yes' if c < threshold else 'no'} |"
                )
    if placed:
        print("\n| query | score | in-scope dev records surer than it | rejected |")
        print("|---|---|---:|---|")
        print("\n".join(placed))


if __name__ == "__main__":
    sys.exit(main())
