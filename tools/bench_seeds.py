"""ptedge at defaults against the linear probe over training seeds, on the MiniLM tasks.

The quality benchmark (``tools/bench_quality.py``) trains one seed per method, and on
BANKING77 its int8 bundle came out 4 of 3,080 test records behind the linear probe; one
test accuracy's standard error there is 0.48 points (15 records). One run is one draw of
the prompt's start, the batch order and the carved dev split, so this asks the goal over
several: for each seed, the README's command with ``--seed S`` (nothing else added: the
seed also draws the dev split ptedge carves when the task has none), ``ptedge export
--quantize int8`` (the guard judging on that dev split), both bundles scored on the test
split, and the quality benchmark's linear probe on the same training records, the same
dev split, the run's budget and seed S's batch order.

    python tools/bench_seeds.py                        # BANKING77, seeds 0,1,2
    python tools/bench_seeds.py --tasks clinc150 --seeds 0,1

Runs execute one thread each, ``--workers`` at a time; finished seeds are kept under
``--work`` and not rerun. Writes docs/results/seeds.{json,md}.

Not for: choosing defaults (``tools/bench_defaults.py`` does, on dev splits only); PEFT
(``tools/bench_quality.py``; 26 points behind on BANKING77, it does not bind the goal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bench_common as bc
import bench_defaults
import bench_quality


def _cli(*args: str) -> dict:
    """``ptedge ARGS``, one thread; its last stdout line, parsed as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "ptedge.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=bc.ROOT)
    if res.returncode:
        sys.exit(f"ptedge {' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def train_flags(task: str, model: Path) -> list[str]:
    """The quality benchmark's command for ``task`` (the README's), without --out."""
    spec = bench_quality.MINILM_TASKS[task]
    src = bc.need_data(spec["dir"])
    flags = ["--model", str(model), "--train", str(src / spec["train"])]
    flags += ["--dev", str(src / spec["dev"])] if spec["dev"] else []
    flags += ["--template", f"[P:3] {{{spec['field']}}} [P:3] [MASK]"]
    return flags + ["--label-field", spec["label"]]


def run_seed(work: Path, model: Path, task: str, seed: int) -> dict:
    """Train, export int8, score fp32 and int8 on the test split; cached."""
    res_file = work / "results" / f"{task}__s{seed}.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    spec = bench_quality.MINILM_TASKS[task]
    test = str(bc.need_data(spec["dir"]) / spec["test"])
    run, int8 = work / "runs" / f"{task}-s{seed}", work / "bundles" / f"{task}-s{seed}-int8"
    flags = [*train_flags(task, model), "--seed", str(seed)]
    t0 = time.perf_counter()
    _cli("train", *flags, "--force", "--out", str(run))
    train_s = time.perf_counter() - t0
    _cli("export", str(run), "--out", str(int8), "--quantize", "int8", "--force")
    meta = json.loads((run / "ptedge.json").read_text())
    quant = json.loads((int8 / "ptedge.json").read_text())["quantization"]
    result = {
        "task": task,
        "seed": seed,
        "command": "ptedge train " + " ".join(bench_quality._shown(flags)),
        "steps": meta["steps"],
        "batch_size": meta["batch_size"],
        "defaults": meta["defaults"],
        "best": meta["best"],
        "fp32": _cli("eval", str(run), "--data", test),
        "int8": _cli("eval", str(int8), "--data", test),
        "int8_recipe": quant["recipe"],
        "int8_guard": quant["guard"],
        "train_s": round(train_s, 1),
    }
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.write_text(json.dumps(result) + "\n")
    bc.log(f"{task} seed {seed}: int8 {result['int8']['accuracy']:.4f}")
    return result


def probe(work: Path, model: Path, task: str, seed: int, run: dict) -> dict:
    """The quality benchmark's linear probe on the records, dev split and budget of the
    seed's run, its batches drawn with the seed; cached."""
    from ptedge.data import read_records
    from ptedge.defaults import carve_dev

    res_file = work / "results" / f"{task}__s{seed}__probe.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    spec = bench_quality.MINILM_TASKS[task]
    src, label = bc.need_data(spec["dir"]), spec["label"]
    recs = read_records(str(src / spec["train"]))
    if spec["dev"]:
        train, dev = list(recs), list(read_records(str(src / spec["dev"])))
    else:  # the split ``ptedge train --seed S`` carved, checked against the run's dev.jsonl
        keep, held = carve_dev(len(recs), seed, [r[label] for r in recs])
        train, dev = [recs[i] for i in keep], [recs[i] for i in held]
        run_dir = work / "runs" / f"{task}-s{seed}"
        carved = [json.loads(x) for x in (run_dir / "dev.jsonl").read_text().splitlines()]
        if carved != dev:
            sys.exit(f"{task} seed {seed}: the carved dev split differs from the run's dev.jsonl")
    index = {lab: i for i, lab in enumerate(sorted({r[label] for r in train}))}

    def pairs(rows):
        return [(r, index[r[label]]) for r in rows if r[label] in index]

    result = bench_quality.linear_probe(
        model,
        spec["field"],
        pairs(train),
        pairs(dev),
        pairs(read_records(str(src / spec["test"]))),
        len(index),
        run["steps"],
        run["batch_size"],
        seed=seed,
        with_dev=not spec["dev"],
    )
    result |= {"task": task, "seed": seed}
    res_file.write_text(json.dumps(result) + "\n")
    return result


def markdown(result: dict) -> str:
    f = bc.fmt
    lines = [
        "# ptedge at defaults against the linear probe, over training seeds",
        "",
        f"Machine: {bc.machine_line(result['machine'])}. `{result['command']}`, "
        f"{result['wall_s'] / 60:.0f} min, seeds already under --work reused (training took "
        f"{sum(r['train_s'] for r in result['runs']) / 60:.0f} min over the "
        f"{len(result['runs'])} runs, `train_s` in seeds.json).",
        "",
        "Each row: the README's command with `--seed S` (which also draws the dev split "
        "ptedge carves where the task has no dev file), `ptedge export RUN --out B --quantize "
        "int8`, both scored on the test split "
        "(only scored); the linear probe (`tools/bench_quality.py`'s: mean-pooled frozen "
        "all-MiniLM-L6-v2, the better on dev of SGD at the budget, its lr chosen on dev, and a "
        "logistic regression solved to convergence, C = 1) on the same training records, dev "
        "split and budget, its batches drawn with S. One thread a run.",
        "",
        "| task | seed | steps × batch | head refit | ptedge fp32 | ptedge int8 | linear probe "
        "(its fit) | int8 − probe (records) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for t in result["tasks"]:
        cells = result["tasks"][t]
        for c in cells["seeds"]:
            diff = round((c["int8"] - c["probe"]) * c["n"])
            lines.append(
                f"| {t} | {c['seed']} | {c['steps']} × {c['batch_size']} | {c['head_refit']} | "
                f"{f(c['fp32'], 4)} | {f(c['int8'], 4)} | {f(c['probe'], 4)} "
                f"({c.get('probe_fit') or 'SGD'}) | {diff:+d} |"
            )
        m = cells["mean"]
        lines.append(
            f"| **{t}, mean** | | | | {f(m['fp32'], 4)} | **{f(m['int8'], 4)}** | "
            f"{f(m['probe'], 4)} | {m['int8_minus_probe_points']:+.2f} pt |"
        )
    lines += [
        "",
        "Per task: int8 − probe, points, by seed; its mean and that mean's standard "
        "error over seeds:",
        "",
    ]
    for t, cells in result["tasks"].items():
        m = cells["mean"]
        by = ", ".join(f"{d:+.2f}" for d in m["int8_minus_probe_by_seed"])
        k, n = len(cells["seeds"]), cells["seeds"][0]["n"]
        lines.append(
            f"- {t}: {by}; mean {m['int8_minus_probe_points']:+.2f} ± {m['se_points']:.2f} "
            f"(level or ahead on {m['ahead']} of {k} seeds; n = {n})"
        )
    return "\n".join(lines) + "\n"


def summarise(runs: list[dict], probes: list[dict]) -> dict:
    """Per task: each seed's accuracies, and their means over seeds."""
    pr = {(p["task"], p["seed"]): p for p in probes}
    tasks: dict = {}
    for r in runs:
        p = pr[(r["task"], r["seed"])]
        refit = (r["defaults"].get("head_refit") or {}).get("value")
        tasks.setdefault(r["task"], {"seeds": []})["seeds"].append(
            {
                "seed": r["seed"],
                "steps": r["steps"],
                "batch_size": r["batch_size"],
                "head_refit": refit,
                "fp32": r["fp32"]["accuracy"],
                "int8": r["int8"]["accuracy"],
                "probe": p["accuracy"],
                "probe_fit": p["fit"],
                "n": r["int8"]["n"],
            }
        )
    for cells in tasks.values():
        rows = cells["seeds"]
        k = len(rows)
        diffs = [100 * (c["int8"] - c["probe"]) for c in rows]
        mean = sum(diffs) / k
        var = sum((d - mean) ** 2 for d in diffs) / (k - 1) if k > 1 else float("nan")
        cells["mean"] = {
            **{m: sum(c[m] for c in rows) / k for m in ("fp32", "int8", "probe")},
            "int8_minus_probe_by_seed": diffs,
            "int8_minus_probe_points": mean,
            "se_points": (var / k) ** 0.5,
            "ahead": sum(d >= 0 for d in diffs),
        }
    return tasks


def main(argv: list[str] | None = None) -> None:
    from ptedge.backbones import fetch

    ap = bench_defaults.study_parser(__doc__, "seeds")
    ap.add_argument("--tasks", default="banking77", help="comma-separated MiniLM tasks")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    for t in tasks:
        if t not in bench_quality.MINILM_TASKS:
            sys.exit(f"--tasks: unknown task {t!r} ({', '.join(bench_quality.MINILM_TASKS)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    work, model = Path(a.work), fetch("minilm-l6", quiet=True)
    jobs = [(t, s) for t in tasks for s in seeds]
    with ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda j: run_seed(work, model, *j), jobs))
    probes = [probe(work, model, r["task"], r["seed"], r) for r in runs]
    command = "python tools/bench_seeds.py" + (
        f" --tasks {a.tasks}" if tasks != ["banking77"] else ""
    )
    command += f" --seeds {a.seeds}" if a.seeds != "0,1,2" else ""
    result = {
        "benchmark": "seeds",
        "command": command,
        "machine": bc.machine(),
        "seeds": seeds,
        "tasks": summarise(runs, probes),
        "runs": runs,
        "probes": probes,
        "wall_s": time.perf_counter() - t0,
    }
    bc.write_report(Path(a.out), "seeds", result, markdown(result))
    bc.log(f"wrote {Path(a.out) / 'seeds.json'} and seeds.md")


if __name__ == "__main__":
    main()
