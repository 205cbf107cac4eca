"""Which mean the linear head reads: over every token, or over the record's own tokens.

``--pool mean`` averages the backbone's last hidden states over every attended position,
the prompt's pseudo tokens and ``[MASK]`` included; ``--pool text`` leaves those out and
averages the record's own tokens (and the backbone's special tokens, as a
sentence-transformers mean does). The question: which should the default be?

Each candidate is the README's command with ``--pool`` added, scored on records no run
saw (test splits are never read), one thread a run, ``--workers`` at a time:

- small sets, 20 training sentences per label (``tools/bench_small_steps.py``'s seeded
  draws from BANKING77, seed 1 being ``tools/small_sets.py``'s b77-20pl, and from
  CLINC150): ptedge carves its dev split; scored on 2,000 other records (BANKING77: of its
  training file; CLINC150: of its dev split);
- ``tools/small_sets.py``'s sets of a label set no default was chosen on, CLINC150's
  queries by their 10 domains at 20, 50 and 200 per domain (scored on CLINC150's dev
  split, relabelled), and SST-2 with 1,000 sentences (scored on SST-2's dev split);
  each small or unseen set beside the probe a user would fit (a logistic regression solved
  to convergence, C = 1, on frozen mean-pooled all-MiniLM-L6-v2 embeddings of the whole
  training file);
- the full tasks on ``tools/bench_defaults.py``'s dev splits: SST-2 and CLINC150 train on
  their training file with ``--dev`` A (500 dev records), BANKING77 on 85% of its
  train.csv carving its own dev split; scored on dev B (BANKING77: A and B, its held-out
  15%). ptedge's default budget (no ``--steps``).

Finished candidates are kept under ``--work`` and not rerun.

    python tools/bench_pool.py     # writes docs/results/pool.{json,md}
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bench_common as bc
import bench_defaults
import bench_quality
import bench_small_steps
import small_sets

CANDIDATES = ("mean", "text")
SHIPPED = "mean"  # what ptedge.defaults.pool chooses
SMALL = (("banking77", 1), ("banking77", 2), ("banking77", 3), ("clinc150", 1))
# tools/small_sets.py's folder -> (label, text field, held-out file under the shared data)
UNSEEN = {
    "clinc-domains-20": ("domain", "text", "clinc150/dev.csv"),
    "clinc-domains-50": ("domain", "text", "clinc150/dev.csv"),
    "clinc-domains-200": ("domain", "text", "clinc150/dev.csv"),
    "sst2-1k": ("label", "sentence", "sst2/dev.tsv"),
}
FULL = ("clinc150", "sst2", "banking77")


def _result(work: Path, tag: str, make) -> dict:
    path = work / "results" / f"{tag}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    bc.log(f"{tag}: {result['accuracy']:.4f}")
    return result


def _candidate(
    work: Path, model: Path, tag: str, train: Path, spec: dict, pool: str, scored: list[Path]
) -> dict:
    """The README's command with ``--pool pool`` on ``train`` (``spec``: label, field and
    an optional ``dev`` file), scored on the ``scored`` files together; cached."""

    def make() -> dict:
        run = work / "runs" / tag
        cmd = ["--model", str(model), "--train", str(train), "--label-field", spec["label"]]
        cmd += ["--template", f"[P:3] {{{spec['field']}}} [P:3] [MASK]", "--pool", pool]
        cmd += ["--dev", str(spec["dev"])] if spec.get("dev") else []
        train_s, first = bench_defaults.train_and_score(
            [*cmd, "--force", "--out", str(run)], run, scored[0]
        )
        evals = [first, *(bench_defaults.score(run, f) for f in scored[1:])]
        n = sum(e["n"] for e in evals)
        right = sum(e["accuracy"] * e["n"] for e in evals)
        return {
            "set": tag.split("__")[0],
            "pool": pool,
            "accuracy": right / n,
            "n": n,
            "train_s": train_s,
        }

    return _result(work, tag, make)


def small_run(work: Path, model: Path, name: str, seed: int, pool: str) -> dict:
    """One candidate on one small set (ptedge carves its dev split), scored on its
    held-out records."""
    files = bench_small_steps.small_set(work, name, seed)
    spec = {"label": bench_small_steps.SETS[name][1], "field": "text"}
    return _candidate(
        work, model, f"{name}-s{seed}__{pool}", files["train"], spec, pool, [files["heldout"]]
    )


def unseen_files(work: Path, name: str) -> dict[str, Path]:
    """``train`` (tools/small_sets.py's file, written if missing) and ``heldout`` (a dev
    split none of its records come from; CLINC150's relabelled by domain under ``work``)."""
    label, _, held = UNSEEN[name]
    folder = bc.ROOT / "runs" / "unseen" / name
    train = next(folder.glob("train.*"), None)
    if train is None:
        small_sets.main()
        train = next(folder.glob("train.*"))
    if not held.startswith("clinc150/"):
        return {"train": train, "heldout": bc.need_data(held.split("/")[0]) / held.split("/")[1]}
    path = work / "data" / "clinc-domains-dev.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        bc.write_records(path, small_sets.by_domain_records("dev.csv"), ["text", label])
    return {"train": train, "heldout": path}


def unseen_run(work: Path, model: Path, name: str, pool: str) -> dict:
    """One candidate on one of small_sets.py's sets (ptedge carves its dev split), scored
    on its held-out dev split."""
    label, field, _ = UNSEEN[name]
    files = unseen_files(work, name)
    spec = {"label": label, "field": field}
    return _candidate(
        work, model, f"{name}__{pool}", files["train"], spec, pool, [files["heldout"]]
    )


def probe(work: Path, model: Path, tag: str, files: dict[str, Path], label: str, field: str):
    """The converged probe on the whole training file, scored on the held-out records."""

    def make() -> dict:
        import torch

        from ptedge import head_fit
        from ptedge.data import read_records

        train, held = read_records(str(files["train"])), read_records(str(files["heldout"]))
        index = {k: i for i, k in enumerate(sorted({r[label] for r in train}))}
        emb = bench_quality.mean_embeddings(model, [r[field] for r in [*train, *held]])
        x_tr, x_ho = emb[: len(train)], emb[len(train) :]  # (N, H), (M, H)
        y_tr, y_ho = (torch.tensor([index[r[label]] for r in s]) for s in (train, held))
        head = head_fit.fit_converged(x_tr, y_tr, len(index))
        with torch.no_grad():
            acc = float((head(x_ho).argmax(-1) == y_ho).float().mean())
        return {"set": tag, "pool": "probe", "accuracy": acc, "n": len(held)}

    return _result(work, f"{tag}__probe", make)


def small_probe(work: Path, model: Path, name: str, seed: int) -> dict:
    """The converged probe on one of bench_small_steps' draws."""
    files = bench_small_steps.small_set(work, name, seed)
    return probe(work, model, f"{name}-s{seed}", files, bench_small_steps.SETS[name][1], "text")


def unseen_probe(work: Path, model: Path, name: str) -> dict:
    """The converged probe on one of small_sets.py's sets."""
    label, field, _ = UNSEEN[name]
    return probe(work, model, name, unseen_files(work, name), label, field)


def full_run(work: Path, model: Path, task: str, pool: str) -> dict:
    """One candidate on one full task (bench_defaults' splits), scored on dev B (BANKING77,
    whose dev A is held out rather than given: on A and B)."""
    spec, files = bench_defaults.TASKS[task], bench_defaults.splits(work, task)
    given = {"label": spec["label"], "field": spec["field"]}
    if spec["dev"]:
        given["dev"] = files["A"]
    scored = [files["B"]] if spec["dev"] else [files["B"], files["A"]]
    return _candidate(work, model, f"{task}__{pool}", files["train"], given, pool, scored)


def markdown(result: dict) -> str:
    by = {(r["set"], r["pool"]): r for r in result["runs"]}
    sets = list(dict.fromkeys(r["set"] for r in result["runs"]))
    lines = [
        "# The linear head's mean: every token, or the record's own (records no run saw)",
        "",
        bc.machine_line(result["machine"]) + f" `{result['command']}`.",
        "",
        "all-MiniLM-L6-v2, linear head, `[P:3] {text} [P:3] [MASK]` with `--pool mean` (the "
        "mean over every token, pseudo tokens and [MASK] included) or `--pool text` (the "
        "record's own tokens and the special tokens), ptedge's defaults otherwise; one thread "
        "a run. Small sets (`-sN`: draw N): 20 sentences per label, ptedge carves its dev "
        "split, scored on 2,000 other records (BANKING77: of its training file; CLINC150: of "
        "its dev split). tools/small_sets.py's sets (ptedge carves its dev split): CLINC150's "
        "queries by their 10 domains, N per domain, scored on CLINC150's dev split "
        "relabelled; SST-2 with 1,000 sentences, scored on its dev split. Each small set "
        "beside the converged probe on its whole training file. Full tasks: "
        "tools/bench_defaults.py's splits, scored on dev B (BANKING77: its held-out 15%). "
        + result.get("provenance", ""),
        "",
        "| set (records scored) | mean | text | text - mean (points) | probe |",
        "|---|---:|---:|---:|---:|",
    ]
    gains = []
    for s in sets:
        mean, text = by.get((s, "mean")), by.get((s, "text"))
        fit = by.get((s, "probe"))
        if not (mean and text):
            continue
        gains.append(100 * (text["accuracy"] - mean["accuracy"]))
        p = f"{fit['accuracy']:.4f}" if fit else "-"
        lines.append(
            f"| {s} ({text['n']}) | {mean['accuracy']:.4f} | {text['accuracy']:.4f} | "
            f"{gains[-1]:+.2f} | {p} |"
        )
    lines += [
        "",
        f"text minus mean: {sum(gains) / len(gains):+.2f} points on average over {len(gains)} "
        f"sets, better on {sum(g > 0 for g in gains)}, worse on {sum(g < 0 for g in gains)}.",
        "",
        "Leave one full task out (each gets the pool with the better mean on the other two):",
        "",
    ]
    full = [t for t in FULL if all((t, c) in by for c in CANDIDATES)]
    for task in full:
        others = [t for t in full if t != task]
        pick = max(CANDIDATES, key=lambda c: sum(by[(t, c)]["accuracy"] for t in others))
        lines.append(
            f"- {task}: the others pick `{pick}`, {by[(task, pick)]['accuracy']:.4f} "
            f"(`{SHIPPED}`, the default: {by[(task, SHIPPED)]['accuracy']:.4f})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from ptedge.backbones import fetch

    a = bench_defaults.study_parser(__doc__, "pool").parse_args(argv)
    t0 = time.perf_counter()
    work, model = Path(a.work), fetch("minilm-l6", quiet=True)
    jobs = [lambda t=t, p=p: full_run(work, model, t, p) for t in FULL for p in CANDIDATES]
    jobs += [lambda s=s, p=p: small_run(work, model, *s, p) for s in SMALL for p in CANDIDATES]
    jobs += [lambda s=s, p=p: unseen_run(work, model, s, p) for s in UNSEEN for p in CANDIDATES]
    with ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda job: job(), jobs))
    runs += [small_probe(work, model, *s) for s in SMALL]
    runs += [unseen_probe(work, model, s) for s in UNSEEN]
    result = {
        "benchmark": "pool",
        "command": "python tools/bench_pool.py",
        "machine": bc.machine(),
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    provenance = work / "provenance.txt"  # how cached runs were made, when not by this tool
    if provenance.is_file():
        result["provenance"] = provenance.read_text().strip()
    bc.write_report(Path(a.out), "pool", result, markdown(result))
    bc.log(f"wrote {Path(a.out) / 'pool.json'} and pool.md")


if __name__ == "__main__":
    main()
