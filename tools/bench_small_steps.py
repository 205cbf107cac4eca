"""How many steps the linear head trains by default on small training sets.

ptedge's rule (250 records per label) against the 300-step floor, on records no run saw.

The linear head's default budget sees 250 records per label (``ptedge.defaults.steps``).
On a full training file that is about two epochs (BANKING77 602 steps, CLINC150 the
1000-step cap), but on 20 records per label it means 12 to 14 passes over the same
sentences, and the prompt encoder fits them (BANKING77, 20 per intent: training loss 0.02
at step 600, and the int8 bundle 1.2 test points behind a linear probe:
``docs/results/analyses.md``). The question: would a cap on the passes, which leaves
such sets the 300-step floor (STEPS_MIN), do better? Measured: no (see the report); the
rule stands.

Small sets: ``PER_LABEL`` training sentences per label drawn (``random.Random(seed)``)
from BANKING77's and CLINC150's training files. ptedge gets the README's command (no
``--dev``: it carves 10% as a user's run would) with the candidate's ``--steps``; each
candidate is scored on 2,000 records it never saw: the rest of BANKING77's training
file, CLINC150's dev split. Test splits are never read. MiniLM (all-MiniLM-L6-v2),
linear head, ptedge's defaults otherwise. The quality benchmark's linear probe gets the
same records, the carved dev split and the rule's budget. Runs execute one thread each,
``--workers`` at a time; finished candidates are kept under ``--work`` and not rerun.

    python tools/bench_small_steps.py     # writes docs/results/small_steps.{json,md}
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bench_common as bc
import bench_defaults
import bench_quality

from ptedge import defaults
from ptedge.data import read_records
from ptedge.defaults import carve_dev

PER_LABEL = 20  # training sentences per label of each small set
HELD_OUT = 2000  # records each candidate is scored on
# set name -> (shared data folder, label field, the file held-out records come from)
SETS = {
    "banking77": ("banking77", "category", "train.csv"),
    "clinc150": ("clinc150", "intent", "dev.csv"),
}
# (set, sampling seed); seed 1 of BANKING77 is tools/small_sets.py's b77-20pl
DRAWS = (("banking77", 1), ("banking77", 2), ("banking77", 3), ("clinc150", 1), ("clinc150", 2))


BATCH = defaults.LINEAR_BATCH  # what the candidates train at, by ptedge's default
# name -> (cache tag, steps for n training records of n labels); the first is ptedge's rule
CANDIDATES = {
    "250 per label": ("rule", lambda n, labels: defaults.steps(n, BATCH, labels).value),
    "300 steps": ("300steps", lambda n, labels: defaults.STEPS_MIN),
}


def small_set(work: Path, name: str, seed: int) -> dict[str, Path]:
    """``train.csv`` (PER_LABEL per label, shuffled) and ``heldout.csv`` (HELD_OUT records
    from the held-out file, none of them in train), written once under ``work``."""
    folder = work / "data" / f"{name}-{PER_LABEL}pl-s{seed}"
    files = {"train": folder / "train.csv", "heldout": folder / "heldout.csv"}
    if all(p.is_file() for p in files.values()):
        return files
    data, label, held_file = SETS[name]
    src = bc.need_data(data)
    rng = random.Random(seed)
    by_label: dict[str, list] = defaultdict(list)
    for r in read_records(str(src / "train.csv")):
        by_label[r[label]].append(r)
    train = [r for k in sorted(by_label) for r in rng.sample(by_label[k], PER_LABEL)]
    rng.shuffle(train)
    taken = {(r["text"], r[label]) for r in train}
    pool = [r for r in read_records(str(src / held_file)) if (r["text"], r[label]) not in taken]
    held = rng.sample(pool, min(HELD_OUT, len(pool)))
    bc.write_records(files["train"], train, ["text", label])
    bc.write_records(files["heldout"], held, ["text", label])
    return files


def carved(files: dict[str, Path], label: str) -> tuple[list[dict], list[int], list[int]]:
    """The small set's training records, and which of them ptedge trains on and which it
    carves as dev (``ptedge.defaults.carve_dev``, as ``ptedge train`` does without --dev)."""
    recs = read_records(str(files["train"]))
    keep, held = carve_dev(len(recs), bench_quality.SEED, [r[label] for r in recs])
    return recs, keep, held


def run_one(work: Path, model: Path, name: str, seed: int, candidate: str) -> dict:
    """Train one candidate on one small set, score it on the held-out records; cached."""
    short, budget = CANDIDATES[candidate]
    tag = f"{name}-s{seed}__{short}"
    res_file = work / "results" / f"{tag}.json"
    if res_file.is_file():
        return json.loads(res_file.read_text()) | {"candidate": candidate}
    files, label = small_set(work, name, seed), SETS[name][1]
    recs, keep, _ = carved(files, label)
    flags = ["--steps", str(budget(len(keep), len({r[label] for r in recs})))]
    run = work / "runs" / tag
    cmd = ["--model", str(model), "--train", str(files["train"])]
    cmd += ["--template", "[P:3] {text} [P:3] [MASK]", "--label-field", label]
    cmd += [*flags, "--force", "--out", str(run)]
    train_s, held = bench_defaults.train_and_score(cmd, run, files["heldout"])
    meta = json.loads((run / "ptedge.json").read_text())
    result = {
        "set": name,
        "seed": seed,
        "candidate": candidate,
        "flags": flags,
        "train_records": len(recs),
        "heldout": held,
        "steps": meta["steps"],
        "best": meta["best"],
        "defaults": meta.get("defaults"),
        "train_s": train_s,
    }
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.write_text(json.dumps(result) + "\n")
    bc.log(f"{tag}: held-out {held['accuracy']:.4f} ({train_s} s)")
    return result


def probe(work: Path, model: Path, name: str, seed: int, rule: dict) -> dict:
    """The quality benchmark's linear probe (mean-pooled frozen MiniLM, its fit chosen on dev)
    on the records and budget of the rule's run (its carved dev split), scored on the same
    held-out records; cached."""
    res_file = work / "results" / f"{name}-s{seed}__probe.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    files, label = small_set(work, name, seed), SETS[name][1]
    recs, keep, held = carved(files, label)
    index = {lab: i for i, lab in enumerate(sorted({r[label] for r in recs}))}

    def pairs(rows):
        return [(r, index[r[label]]) for r in rows]

    result = bench_quality.linear_probe(
        model,
        "text",
        pairs([recs[i] for i in keep]),
        pairs([recs[i] for i in held]),
        pairs(read_records(str(files["heldout"]))),
        len(index),
        rule["steps"],
        BATCH,
    )
    result |= {"set": name, "seed": seed, "steps": rule["steps"]}
    res_file.write_text(json.dumps(result) + "\n")
    return result


def markdown(result: dict) -> str:
    f = bc.fmt
    lines = [
        "# The linear head's default budget on small training sets (held-out records only)",
        "",
        f"Machine: {bc.machine_line(result['machine'])}. `{result['command']}`, "
        f"{result['wall_s'] / 60:.0f} min (candidates already under --work reused).",
        "",
        f"all-MiniLM-L6-v2, linear head, `[P:3] {{text}} [P:3] [MASK]`, {PER_LABEL} training "
        "sentences per label (seeded draws), ptedge's defaults otherwise (a 10% dev split "
        "carved from them picks the kept step); each run scored on "
        f"{HELD_OUT:,} records it never saw (BANKING77: the rest of its training file; "
        "CLINC150: its dev split). One thread a run, two runs at once.",
        "",
        "| small set (train records) | candidate | steps (epochs) | held-out accuracy | kept "
        "step (carved dev) | training (s) | linear probe at the rule's budget |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    order = {d: i for i, d in enumerate(DRAWS)}
    probes = {(p["set"], p["seed"]): p["accuracy"] for p in result["probes"]}
    names = list(CANDIDATES)
    for r in sorted(
        result["runs"], key=lambda r: (order[(r["set"], r["seed"])], names.index(r["candidate"]))
    ):
        n_train = r["train_records"] * 0.9  # what remains after the carved dev split
        epochs = r["steps"] * BATCH / n_train
        lines.append(
            f"| {r['set']} seed {r['seed']} ({r['train_records']}) | {r['candidate']} | "
            f"{r['steps']} ({epochs:.1f}) | {f(r['heldout']['accuracy'])} | {r['best']['step']} "
            f"({f(r['best']['dev_accuracy'])}) | {r['train_s']:.0f} | "
            f"{f(probes[(r['set'], r['seed'])])} |"
        )
    lines += [
        "",
        "Per draw, held-out points: 300 steps minus the rule; the rule minus the probe:",
        "",
    ]
    by = {(r["set"], r["seed"], r["candidate"]): r["heldout"] for r in result["runs"]}
    floor_gain, probe_gap = [], []
    for name, seed in DRAWS:
        rule, short = by[(name, seed, "250 per label")], by[(name, seed, "300 steps")]
        floor_gain.append(100 * (short["accuracy"] - rule["accuracy"]))
        probe_gap.append(100 * (rule["accuracy"] - probes[(name, seed)]))
        lines.append(
            f"- {name} seed {seed}: {floor_gain[-1]:+.2f}; {probe_gap[-1]:+.2f} (n = {rule['n']})"
        )
    k = len(DRAWS)
    se = [100 * (a["accuracy"] * (1 - a["accuracy"]) / a["n"]) ** 0.5 for a in by.values()]
    lines += [
        "",
        f"Mean over the {k} draws: 300 steps {sum(floor_gain) / k:+.2f} points against the "
        f"rule (better on {sum(g > 0 for g in floor_gain)} of {k}); the rule "
        f"{sum(probe_gap) / k:+.2f} against the probe (ahead on "
        f"{sum(g > 0 for g in probe_gap)} of {k}). One held-out accuracy's standard error "
        f"here is {min(se):.1f} to {max(se):.1f} points.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from ptedge.backbones import fetch

    a = bench_defaults.study_parser(__doc__, "small_steps").parse_args(argv)
    t0 = time.perf_counter()
    work, model = Path(a.work), fetch("minilm-l6", quiet=True)
    # the longest runs (the rule's budget, CLINC150's first) start first
    jobs = [(name, seed, c) for c in CANDIDATES for name, seed in reversed(DRAWS)]
    with ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda j: run_one(work, model, *j), jobs))
    rules = {(r["set"], r["seed"]): r for r in runs if r["candidate"] == "250 per label"}
    probes = [probe(work, model, name, seed, rules[(name, seed)]) for name, seed in DRAWS]
    result = {
        "benchmark": "small_steps",
        "command": "python tools/bench_small_steps.py",
        "machine": bc.machine(),
        "per_label": PER_LABEL,
        "candidates": {k: tag for k, (tag, _) in CANDIDATES.items()},
        "runs": runs,
        "probes": probes,
        "wall_s": time.perf_counter() - t0,
    }
    bc.write_report(Path(a.out), "small_steps", result, markdown(result))
    bc.log(f"wrote {Path(a.out) / 'small_steps.json'} and small_steps.md")


if __name__ == "__main__":
    main()
