"""The accuracy guard of ``--quantize``: which quantized graph may ship.

Each task's guard records (``--eval``, else its dev file, else its training file; at most
``--eval-max``) are scored by the fp32 graph and by each recipe's graph, in the order the
caller gives, and the first recipe that no task — nor all tasks' records together —
loses more than ``--max-drop`` accuracy points on is kept.

A loss counts only when the guard records can tell it from chance. Of the records the
two graphs disagree on, the quantized one got ``lost`` wrong that fp32 got right and
``gained`` the other way round; were quantization harmless, each such record would be a
coin flip, and the loss counts when losing ``lost`` or more of them that way is unlikely
(one-sided exact sign test, p <= ``SIGNIFICANCE``). On a thousand dev records a loss past
one point is eleven records or more lost net, which counts unless the two graphs disagree
on some 35 records or more (static int8 encoders disagree with fp32 on about one record
in a hundred); on LAMA's relations, with 4 to 100 scorable dev facts each, one fact is 1
to 25 points, and one unlucky fact no longer refuses the bundle. A
bundle of several tasks is also judged on all their records together, so many small
losses that each pass as chance still add up to a refusal.

Not responsible for: the recipes (``ptedge.export.quantize``, ``ptedge.export.causal``),
writing the bundle (``ptedge.export.pipeline``).
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

from ptedge.data import Records, labels_of, read_records
from ptedge.export.bundle import data_source
from ptedge.export.scoring import onnx_generate, onnx_scores
from ptedge.targets import class_targets, vocab_targets

SIGNIFICANCE = 0.05  # a loss past --max-drop counts when the sign test's p is at most this
ALL_TASKS = "all tasks"  # what the guard calls the records of every task together


def guard_data(run, args):
    """(path, records, targets) the guard scores a task on; a target is None where the
    record cannot be scored (e.g. a LAMA object of several tokens)."""
    path = args.eval_file or run.cfg.dev_file or run.cfg.train_file
    recs = read_records(path)
    if len(recs) > args.eval_max:
        idx = sorted(random.Random(0).sample(range(len(recs)), args.eval_max))
        recs = Records(recs.path, [recs[i] for i in idx], [recs.lines[i] for i in idx])
    if run.cfg.head == "generate":
        targets = labels_of(recs, run.cfg.label_field)
    elif run.cfg.labels is None:
        targets = vocab_targets(recs, run.cfg.label_field, run.compiled, run.tok)
    else:
        targets = class_targets(recs, run.cfg.label_field, run.cfg.labels)
    return path, recs, targets


def task_correct(session, run, records, targets) -> list[bool]:
    """Whether ``session`` answers each scorable record (target not None) right, in order."""
    keep = [i for i, t in enumerate(targets) if t is not None]
    if run.cfg.head == "generate":
        texts = [run.tok.decode(t) for t in onnx_generate(session, run, records, 32)]
        return [texts[i].strip() == targets[i].strip() for i in keep]
    correct = []
    for i in range(0, len(keep), 32):
        idx = keep[i : i + 32]
        pred = onnx_scores(session, run, [records[j] for j in idx]).argmax(-1)
        correct += [int(p) == targets[j] for p, j in zip(pred, idx, strict=True)]
    return correct


def loss(base: list[bool], quant: list[bool]) -> dict:
    """What quantizing cost on one set of records, given whether fp32 (``base``) and the
    quantized graph (``quant``) answered each right: ``points`` of accuracy lost, records
    ``lost`` (only fp32 right) and ``gained`` (only the quantized graph right), and ``p``,
    the chance of losing at least ``lost`` of the ``lost + gained`` disagreements were
    each a fair coin (1 when they never disagree)."""
    pairs = list(zip(base, quant, strict=True))
    lost = sum(b and not q for b, q in pairs)
    gained = sum(q and not b for b, q in pairs)
    m = lost + gained
    p = sum(math.comb(m, k) for k in range(lost, m + 1)) / 2**m
    points = round(100 * (lost - gained) / max(1, len(base)), 9)  # 1.0000000000000009 is 1
    return {"points": points, "lost": lost, "gained": gained, "p": round(p, 6)}


def records_needed(max_drop: float) -> int:
    """The fewest guard records on which a loss of ``max_drop`` points is as many records as
    the sign test needs to hold a loss against a recipe: ``k`` lost and none gained count
    only when 2**-k <= ``SIGNIFICANCE`` (k >= 5 at 0.05), so 500 records at the default 1
    point. On fewer, only losses well past ``max_drop`` can count (on 20 carved dev
    records, 25 points)."""
    refusable = math.ceil(math.log2(1 / SIGNIFICANCE))
    return math.ceil(100 * refusable / max_drop) if max_drop > 0 else refusable


def counts(cost: dict, max_drop: float) -> bool:
    """Whether a ``loss`` refuses a recipe: past ``max_drop`` points and beyond chance."""
    return cost["points"] > max_drop and cost["p"] <= SIGNIFICANCE


def judge(base: dict[str, list[bool]], quant: dict[str, list[bool]], max_drop: float):
    """(costs, failing): the ``loss`` of each task (task -> per-record correctness of fp32
    and of the quantized graph) and, with several tasks, of all their records together
    (under ``ALL_TASKS``); and those of them that refuse the recipe (``counts``)."""
    costs = {t: loss(base[t], quant[t]) for t in base}
    if len(base) > 1:
        costs[ALL_TASKS] = loss(sum(base.values(), []), sum((quant[t] for t in base), []))
    return costs, {t: c for t, c in costs.items() if counts(c, max_drop)}


def guard_records(runs, args) -> dict:
    """Task name -> its ``guard_data``: what ``guard`` judges each task on."""
    return {run.name: guard_data(run, args) for run in runs}


def guard(
    fp32: Path,
    out: Path,
    runs,
    args,
    names: list[str],
    write: Callable[[str, dict], dict],
    data: dict,
) -> dict:
    """Try the recipes ``names`` in order: ``write(name, data)`` writes one's graph to
    ``out`` and returns what the manifest says of it (``data``: each task's guard data,
    ``guard_records``); the first recipe whose losses do not count (``counts``) is kept.
    If none passes, the export is refused, or with ``args.allow_accuracy_drop`` the recipe
    that lost least is written. Returns the kept recipe's description with the guard's
    measurements."""
    import onnxruntime as ort

    def session(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])

    precision = args.quantize
    ref = session(fp32)
    base = {r.name: task_correct(ref, r, *data[r.name][1:]) for r in runs}
    del ref
    tried = []
    for name in names:
        info = write(name, data)
        s = session(out)
        quant, measured = {}, {}
        for run in runs:
            path, recs, targets = data[run.name]
            quant[run.name] = task_correct(s, run, recs, targets)
            measured[run.name] = {
                "data": {**data_source(path), "n": len(quant[run.name])},
                "fp32_accuracy": _mean(base[run.name]),
                "quantized_accuracy": _mean(quant[run.name]),
            }
        del s
        costs, failing = judge(base, quant, args.max_drop)
        for run in runs:
            m, cost = measured[run.name], costs[run.name]
            m |= {k: cost[k] for k in ("lost", "gained", "p")}
            print(
                f"{precision} guard ({name}) {run.name}: fp32 {m['fp32_accuracy']:.4f}, "
                f"{precision} {m['quantized_accuracy']:.4f} ({_said(cost)}) on "
                f"{m['data']['n']} records of {Path(data[run.name][0]).name}",
                file=sys.stderr,
            )
        worst = max(costs[r.name]["points"] for r in runs)
        info |= {"guard": measured, "max_drop_points": worst}
        if ALL_TASKS in costs:
            info["guard_all_tasks"] = costs[ALL_TASKS]
            n = sum(map(len, quant.values()))
            print(
                f"{precision} guard ({name}) {ALL_TASKS}: {_said(costs[ALL_TASKS])} on {n} records",
                file=sys.stderr,
            )
        if not failing:
            for task, cost in costs.items():
                if cost["points"] > args.max_drop:
                    n = len(base[task]) if task in base else sum(map(len, base.values()))
                    print(
                        f"{precision} guard: {task} loses {cost['points']:.2f} points, past "
                        f"--max-drop {args.max_drop:g} but within chance (p {cost['p']:.3f} > "
                        f"{SIGNIFICANCE:g}) on {n} records: not held against {name!r}; "
                        "--eval FILE with more held-out records judges it finer",
                        file=sys.stderr,
                    )
            return info
        tried.append((worst, name, info, failing))
    worst, name, info, failing = min(tried, key=lambda t: t[0])
    where = ", ".join(f"{r} {c['points']:.2f} (p {c['p']:.3f})" for r, c in failing.items())
    if not args.allow_accuracy_drop:
        raise ValueError(
            f"{precision} loses up to {worst:.2f} accuracy points even with recipe {name!r} "
            f"(limit --max-drop {args.max_drop:g}, losses beyond chance: {where}); use "
            "--allow-accuracy-drop to write it anyway"
        )
    print(
        f"warning: writing {precision} past --max-drop (--allow-accuracy-drop): {where}",
        file=sys.stderr,
    )
    if name != names[-1]:
        measurements = {k: v for k, v in info.items() if k.startswith(("guard", "max_drop"))}
        info = write(name, data) | measurements
    return info


def _said(cost: dict) -> str:
    return (
        f"{cost['points']:+.2f} points lost: {cost['lost']} records lost, {cost['gained']} "
        f"gained, p {cost['p']:.3f}"
    )


def _mean(correct: list[bool]) -> float:
    return sum(correct) / max(1, len(correct))
