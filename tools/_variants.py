"""Training variants of the linear head compared on records no run saw (shared by
``tools/bench_pool.py`` and ``tools/bench_dropout.py``).

A study names its candidates, each a list of ``ptedge train`` flags added to the README's
command (all-MiniLM-L6-v2, ``[P:3] {text} [P:3] [MASK]``, defaults otherwise), and runs
each on three kinds of sets, one thread a run, test splits never read:

- small sets, 20 training sentences per label (``tools/bench_small_steps.py``'s seeded
  draws from BANKING77, seed 1 being ``tools/small_sets.py``'s b77-20pl, and from
  CLINC150): ptedge carves its dev split; scored on 2,000 other records (BANKING77: of its
  training file; CLINC150: of its dev split);
- ``tools/small_sets.py``'s sets: CLINC150's queries by their 10 domains at 20, 50 and 200
  per domain (a label set no default was chosen on; scored on CLINC150's dev split,
  relabelled) and SST-2 with 1,000 sentences (scored on SST-2's dev split); ptedge carves
  its dev split. Small and unseen sets are shown beside the probe a user would fit (a
  logistic regression solved to convergence, C = 1, on frozen mean-pooled
  all-MiniLM-L6-v2 embeddings of the whole training file);
- the full tasks on ``tools/bench_defaults.py``'s dev splits: SST-2 and CLINC150 train on
  their training file with ``--dev`` A (500 dev records), BANKING77 on 85% of its
  train.csv carving its own dev split; scored on dev B (BANKING77: A and B, its held-out
  15%). ptedge's default budget (no ``--steps``).

Finished runs are cached under the study's ``--work`` as ``results/SET__CANDIDATE.json``
and not rerun. Not for choosing anything by itself: the report's leave-one-out lines say
what each held-out task or data set would have been given by the others.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bench_common as bc
import bench_defaults
import bench_quality
import bench_small_steps
import small_sets

SMALL = (("banking77", 1), ("banking77", 2), ("banking77", 3), ("clinc150", 1))
# tools/small_sets.py's folder -> (label, text field, held-out file under the shared data)
UNSEEN = {
    "clinc-domains-20": ("domain", "text", "clinc150/dev.csv"),
    "clinc-domains-50": ("domain", "text", "clinc150/dev.csv"),
    "clinc-domains-200": ("domain", "text", "clinc150/dev.csv"),
    "sst2-1k": ("label", "sentence", "sst2/dev.tsv"),
}
FULL = ("clinc150", "sst2", "banking77")
INTRO = (
    "all-MiniLM-L6-v2, linear head, `[P:3] {text} [P:3] [MASK]`, ptedge's defaults besides "
    "each candidate's flags; one thread a run; test splits never read. Small sets (`-sN`: "
    "draw N): 20 sentences per label, ptedge carves its dev split, scored on 2,000 other "
    "records (BANKING77: of its training file; CLINC150: of its dev split). "
    "tools/small_sets.py's sets (ptedge carves its dev split): CLINC150's queries by their "
    "10 domains, N per domain, scored on CLINC150's dev split relabelled; SST-2 with 1,000 "
    "sentences, scored on its dev split. Each small set beside the converged probe on its "
    "whole training file. Full tasks: tools/bench_defaults.py's splits, scored on dev B "
    "(BANKING77: its held-out 15%)."
)


def family(name: str) -> str:
    """The shared data set a set's records come from (sets of one family are left out
    together, so a held-out data set has no variant of itself among the others)."""
    if name.startswith(("banking77", "b77")):
        return "banking77"
    if name.startswith("clinc"):
        return "clinc150"
    return "sst2"


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
    work: Path,
    model: Path,
    tag: str,
    train: Path,
    spec: dict,
    flags: list[str],
    scored: list[Path],
) -> dict:
    """The README's command plus ``flags`` on ``train`` (``spec``: label, field and an
    optional ``dev`` file), scored on the ``scored`` files together; cached."""

    def make() -> dict:
        run = work / "runs" / tag
        cmd = ["--model", str(model), "--train", str(train), "--label-field", spec["label"]]
        cmd += ["--template", f"[P:3] {{{spec['field']}}} [P:3] [MASK]", *flags]
        cmd += ["--dev", str(spec["dev"])] if spec.get("dev") else []
        train_s, first = bench_defaults.train_and_score(
            [*cmd, "--force", "--out", str(run)], run, scored[0]
        )
        evals = [first, *(bench_defaults.score(run, f) for f in scored[1:])]
        n = sum(e["n"] for e in evals)
        right = sum(e["accuracy"] * e["n"] for e in evals)
        return {
            "set": tag.split("__")[0],
            "candidate": tag.split("__")[1],
            "flags": flags,
            "accuracy": right / n,
            "n": n,
            "train_s": train_s,
        }

    return _result(work, tag, make)


def small_run(work: Path, model: Path, name: str, seed: int, cand: str, flags: list[str]):
    """One candidate on one small draw (ptedge carves its dev split)."""
    files = bench_small_steps.small_set(work, name, seed)
    spec = {"label": bench_small_steps.SETS[name][1], "field": "text"}
    tag = f"{name}-s{seed}__{cand}"
    return _candidate(work, model, tag, files["train"], spec, flags, [files["heldout"]])


def unseen_files(work: Path, name: str) -> dict[str, Path]:
    """``train`` (tools/small_sets.py's file, written if missing) and ``heldout`` (a dev
    split none of its records come from; CLINC150's relabelled by domain under ``work``)."""
    label, _, held = UNSEEN[name]
    folder = bc.ROOT / "runs" / "unseen" / name
    train = next(folder.glob("train.*"), None)
    if train is None:
        small_sets.main()
        train = next(folder.glob("train.*"))
    data, file = held.split("/")
    if data != "clinc150":
        return {"train": train, "heldout": bc.need_data(data) / file}
    path = work / "data" / "clinc-domains-dev.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        bc.write_records(path, small_sets.by_domain_records(file), ["text", label])
    return {"train": train, "heldout": path}


def unseen_run(work: Path, model: Path, name: str, cand: str, flags: list[str]) -> dict:
    """One candidate on one of small_sets.py's sets (ptedge carves its dev split)."""
    label, field, _ = UNSEEN[name]
    files = unseen_files(work, name)
    spec = {"label": label, "field": field}
    tag = f"{name}__{cand}"
    return _candidate(work, model, tag, files["train"], spec, flags, [files["heldout"]])


def full_run(work: Path, model: Path, task: str, cand: str, flags: list[str]) -> dict:
    """One candidate on one full task (bench_defaults' splits), scored on dev B (BANKING77,
    whose dev A is held out rather than given: on A and B)."""
    spec, files = bench_defaults.TASKS[task], bench_defaults.splits(work, task)
    given = {"label": spec["label"], "field": spec["field"]}
    if spec["dev"]:
        given["dev"] = files["A"]
    scored = [files["B"]] if spec["dev"] else [files["B"], files["A"]]
    return _candidate(work, model, f"{task}__{cand}", files["train"], given, flags, scored)


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
        return {"set": tag, "candidate": "probe", "accuracy": acc, "n": len(held)}

    return _result(work, f"{tag}__probe", make)


def run_all(work: Path, model: Path, candidates: dict[str, list[str]], workers: int) -> list:
    """Every candidate on every set (``workers`` runs at a time), then the probes."""
    jobs = [
        lambda t=t, c=c: full_run(work, model, t, c, candidates[c])
        for t in FULL
        for c in candidates
    ]
    jobs += [
        lambda s=s, c=c: small_run(work, model, *s, c, candidates[c])
        for s in SMALL
        for c in candidates
    ]
    jobs += [
        lambda s=s, c=c: unseen_run(work, model, s, c, candidates[c])
        for s in UNSEEN
        for c in candidates
    ]
    with ThreadPoolExecutor(workers) as pool:
        runs = list(pool.map(lambda job: job(), jobs))
    for name, seed in SMALL:
        files = bench_small_steps.small_set(work, name, seed)
        label = bench_small_steps.SETS[name][1]
        runs.append(probe(work, model, f"{name}-s{seed}", files, label, "text"))
    for name, (label, field, _) in UNSEEN.items():
        runs.append(probe(work, model, name, unseen_files(work, name), label, field))
    return runs


def table(runs: list[dict], candidates: list[str], shipped: str) -> list[str]:
    """Markdown lines: each set's accuracy per candidate, the second minus the first, the
    probe; then the leave-one-out lines (by full task, and by data set)."""
    by = {(r["set"], r["candidate"]): r for r in runs}
    base, other = candidates
    sets = [
        s for s in dict.fromkeys(r["set"] for r in runs) if all((s, c) in by for c in candidates)
    ]
    lines = [
        f"| set (records scored) | {base} | {other} | {other} - {base} (points) | probe |",
        "|---|---:|---:|---:|---:|",
    ]
    gains = []
    for s in sets:
        a, b, fit = by[(s, base)], by[(s, other)], by.get((s, "probe"))
        gains.append(100 * (b["accuracy"] - a["accuracy"]))
        p = f"{fit['accuracy']:.4f}" if fit else "-"
        lines.append(
            f"| {s} ({b['n']}) | {a['accuracy']:.4f} | {b['accuracy']:.4f} | "
            f"{gains[-1]:+.2f} | {p} |"
        )
    if not sets:
        return lines
    lines += [
        "",
        f"{other} minus {base}: {sum(gains) / len(gains):+.2f} points on average over "
        f"{len(gains)} sets, better on {sum(g > 0 for g in gains)}, worse on "
        f"{sum(g < 0 for g in gains)}.",
        "",
        "Leave one full task out (each gets the candidate with the better mean on the other two):",
        "",
    ]

    def pick(pool: list[str]) -> str:
        return max(candidates, key=lambda c: sum(by[(s, c)]["accuracy"] for s in pool))

    full = [t for t in FULL if t in sets]
    for task in full:
        chosen = pick([t for t in full if t != task])
        lines.append(
            f"- {task}: the others pick `{chosen}`, {by[(task, chosen)]['accuracy']:.4f} "
            f"(`{shipped}`, the default: {by[(task, shipped)]['accuracy']:.4f})"
        )
    lines += [
        "",
        "Leave one data set out (its full task and every small set cut from it; each gets "
        "the candidate with the better mean over all the other sets):",
        "",
    ]
    for fam in dict.fromkeys(family(s) for s in sets):
        mine = [s for s in sets if family(s) == fam]
        chosen = pick([s for s in sets if family(s) != fam])
        moved = [100 * (by[(s, chosen)]["accuracy"] - by[(s, base)]["accuracy"]) for s in mine]
        lines.append(
            f"- {fam} ({len(mine)} sets): the others pick `{chosen}`; against `{base}` "
            + ", ".join(f"{s} {m:+.2f}" for s, m in zip(mine, moved, strict=True))
        )
    return lines


def markdown(result: dict, title: str, intro: str, shipped: str) -> str:
    """The study's report: title, machine, what was run, the table and leave-one-out lines."""
    md = [f"# {title}", "", bc.machine_line(result["machine"]) + f" `{result['command']}`.", ""]
    md += [f"{intro} {INTRO} {result.get('provenance', '')}".strip(), ""]
    md += table(result["runs"], list(result["candidates"]), shipped)
    return "\n".join(md) + "\n"


def report(args, study: str, candidates: dict[str, list[str]], to_markdown, t0: float) -> None:
    """Run the study (``args``: bench_defaults.study_parser's) and write its report,
    ``to_markdown(result)`` making the page."""
    import time

    from ptedge.backbones import fetch

    work = Path(args.work)
    runs = run_all(work, fetch("minilm-l6", quiet=True), candidates, args.workers)
    result = {
        "benchmark": study,
        "command": f"python tools/bench_{study}.py",
        "machine": bc.machine(),
        "candidates": candidates,
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    provenance = work / "provenance.txt"  # how cached runs were made, when not by this tool
    if provenance.is_file():
        result["provenance"] = provenance.read_text().strip()
    bc.write_report(Path(args.out), study, result, to_markdown(result))
    bc.log(f"wrote {Path(args.out) / (study + '.json')} and {study}.md")
