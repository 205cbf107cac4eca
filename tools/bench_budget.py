"""The linear head's default budget: batch size and records seen per label (issue 12).

``ptedge.defaults.batch_size`` and ``ptedge.defaults.steps`` give the linear head 32-record
batches and at least ``PER_LABEL`` records per label. This benchmark is the evidence: the
head alone, trained as ptedge trains it (``ptedge.head_fit.fit_head``: AdamW at the default
head lr, warm-up and decay, clipping, the seeded batch order) on frozen mean-pooled
all-MiniLM-L6-v2 features of the training records, scored on the dev split, for each
batch size and per-label floor, with the steps ``ptedge.defaults.steps`` gives for them
(clamps included), over three seeds. Leave one task out: the setting best on the other
task's dev split, scored on the held-out task's dev split. Test splits are not read.

What it is not: the prompt is left out (it starts as ``[PAD]`` and moves little in a few
hundred steps; ``bench_quality`` measures the whole method), and SST-2 is left out (two
labels: the per-label floor never binds, one epoch or the cap decides).

    python tools/bench_budget.py              # ~10 min on 2 cores; docs/results/budget.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import _bench_common as bc
import bench_quality as bq

TASKS = {  # task: (folder, train, dev file or None (carved as ptedge does), field, label)
    "banking77": ("banking77", "train.csv", None, "text", "category"),
    "clinc150": ("clinc150", "train.csv", "dev.csv", "text", "intent"),
}
BATCHES = (16, 32)
PER_LABEL = (0, 125, 250, 500)  # 0: one epoch, the rule before the per-label floor
SEEDS = (0, 1, 2)


def features(name: str, model) -> dict:
    """Frozen mean-pooled features and label ids of a task's training and dev records."""
    import torch

    from ptedge.data import read_records
    from ptedge.defaults import carve_dev

    folder, train_file, dev_file, field, label = TASKS[name]
    src = bc.need_data(folder)
    train = list(read_records(src / train_file))
    if dev_file is None:
        keep, held = carve_dev(len(train), 0, [r[label] for r in train])
        dev = [train[i] for i in held]
        train = [train[i] for i in keep]
    else:
        dev = list(read_records(src / dev_file))
    labels = sorted({r[label] for r in train})
    index = {lab: i for i, lab in enumerate(labels)}
    x = bq.mean_embeddings(model, [r[field] for r in train + dev])
    y = torch.tensor([index[r[label]] for r in train + dev])
    n = len(train)
    return {"x": x[:n], "y": y[:n], "x_dev": x[n:], "y_dev": y[n:], "labels": len(labels)}


def steps_for(n: int, batch: int, labels: int, per_label: int) -> int:
    """ptedge.defaults.steps with PER_LABEL set to ``per_label`` (0: no floor)."""
    from ptedge import defaults

    if per_label == 0:
        return defaults.steps(n, batch).value
    with mock.patch.object(defaults, "PER_LABEL", per_label):
        return defaults.steps(n, batch, labels).value


def dev_accuracy(f: dict, steps: int, batch: int, seed: int) -> float:
    import torch

    from ptedge import defaults, head_fit

    batches = head_fit.batch_order(len(f["y"]), steps, batch, seed)
    head = head_fit.fit_head(f["x"], f["y"], batches, f["labels"], defaults.HEAD_LR, seed)
    with torch.no_grad():
        return float((head(f["x_dev"]).argmax(-1) == f["y_dev"]).float().mean())


def leave_one_out(rows: list[dict], shipped: tuple[int, int]) -> dict:
    """``bc.leave_one_out`` over the (batch, per label) settings, with the shipped
    setting's dev accuracy on each held-out task."""
    dev = {(t, f"({r['batch']}, {r['per_label']})"): r[t]["dev"] for r in rows for t in TASKS}
    table = bc.leave_one_out(dev, [f"({r['batch']}, {r['per_label']})" for r in rows])
    for held, row in table.items():
        row["shipped_accuracy"] = dev[held, f"({shipped[0]}, {shipped[1]})"]
    return table


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# The linear head's default budget: batch size and records per label",
        "",
        f"`{result['command']}`, {result['wall_s'] / 60:.1f} min; machine: "
        f"{bc.machine_line(result['machine'])}. The head alone on frozen mean-pooled "
        "all-MiniLM-L6-v2 features, trained as ptedge trains it (head lr "
        f"{result['head_lr']:g}, warm-up and decay, clipping, the seeded batch order), dev "
        f"accuracy, mean of seeds {', '.join(map(str, SEEDS))}; steps as "
        "`ptedge.defaults.steps` gives them (one epoch, or the per-label floor if more, "
        "within [300, 1000]). Per label 0: one epoch only (the rule before the floor).",
        "",
        "| batch | per label | " + " | ".join(f"{t} steps | {t} dev" for t in TASKS) + " |",
        "|---:|---:|" + "---:|---:|" * len(TASKS),
    ]
    for r in rows:
        cells = " | ".join(f"{r[t]['steps']} | {r[t]['dev']:.4f}" for t in TASKS)
        lines.append(f"| {r['batch']} | {r['per_label']} | {cells} |")
    lines += ["", "## Leave one task out", ""]
    lines += [
        "| held out | chosen on the other (batch, per label) | held-out dev | best on "
        "held-out dev | shipped default |",
        "|---|---|---:|---|---:|",
    ]
    for t, pick in result["leave_one_out"].items():
        lines.append(
            f"| {t} | {pick['chosen_by_others']} | {pick['accuracy']:.4f} | "
            f"{pick['best_in_hindsight']} {pick['best_accuracy']:.4f} | "
            f"{pick['shipped_accuracy']:.4f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results", help="folder for budget.json/.md")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from ptedge import defaults
    from ptedge.backbones import fetch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = fetch("minilm-l6")
    feats = {}
    for t in TASKS:
        bc.log(f"embedding {t}")
        feats[t] = features(t, model)
    rows = []
    for batch in BATCHES:
        for per_label in PER_LABEL:
            row = {"batch": batch, "per_label": per_label}
            for t, f in feats.items():
                steps = steps_for(len(f["y"]), batch, f["labels"], per_label)
                accs = [dev_accuracy(f, steps, batch, s) for s in SEEDS]
                row[t] = {"steps": steps, "dev": sum(accs) / len(accs), "per_seed": accs}
            bc.log(json.dumps(row))
            rows.append(row)

    loo = leave_one_out(rows, (defaults.LINEAR_BATCH, defaults.PER_LABEL))
    result = {
        "benchmark": "budget",
        "command": "python tools/bench_budget.py"
        + (f" --threads {a.threads}" if a.threads != 2 else ""),
        "machine": bc.machine(),
        "head_lr": defaults.HEAD_LR,
        "rows": rows,
        "leave_one_out": loo,
        "wall_s": time.perf_counter() - t0,
    }
    bc.write_report(Path(a.out), "budget", result, markdown(result))
    bc.log(f"wrote {Path(a.out) / 'budget.md'}")


if __name__ == "__main__":
    sys.exit(main())
