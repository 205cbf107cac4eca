"""ptedge's calibrated confidence on LAMA, over every T-REx relation.

The quality benchmark trains three LAMA relations, about 200 test facts each; there a
perfectly calibrated model's top-label ECE (15 bins) is itself 0.07-0.08, so an ECE goal
of 0.05 cannot be read from one relation. This study trains the README's LAMA command
(SmolLM2-135M, ``[P:3] {sub_label} [P:3] [MASK]``, the relation's train and dev files,
nothing else) on each relation asked, exports all of them as one bundle (int8, or with
``--precision fp32`` fp32) as the quality benchmark does (a temperature fitted per
relation on its dev facts), scores each relation's dev and test facts with that bundle,
and reports:

- precision@1 and top-label ECE (raw, and at the bundle's temperature) per relation and
  over all test facts together, each ECE beside its floor (``ptedge.calibration.ece_floor``);
- for analysis, the pooled ECE under other temperature rules (``FITS``) computed from the
  same scores on a grid: one temperature fitted on every relation's dev facts together,
  and per-relation temperatures fitted to the top label's correctness instead of the
  full-vocabulary likelihood; on the test facts, and judged on dev facts alone (each
  relation's dev facts in two halves, fitted on one and scored on the other).

    python tools/bench_lama_calibration.py                      # all 41 relations
    python tools/bench_lama_calibration.py --relations P37,P30

Training runs one thread each, ``--workers`` at a time, kept under ``--work`` (a relation
whose run is there is not retrained). Writes docs/results/lama_calibration_PRECISION.{json,md}.

Not for: comparing with PEFT or manual prompts (``tools/bench_quality.py``).
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
import numpy as np

GRID = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))  # temperatures for the analysis


def _cli(threads: int, *args: str) -> dict:
    """``ptedge ARGS`` with ``threads`` threads; its last stdout line, parsed as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "ptedge.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=bc.ROOT)
    if res.returncode:
        sys.exit(f"ptedge {' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def train_flags(trex: Path, rel: str, model: Path) -> list[str]:
    """The README's LAMA command for relation ``rel``, without --out."""
    return [
        "--model",
        str(model),
        "--train",
        str(trex / "train" / f"{rel}.jsonl"),
        "--dev",
        str(trex / "dev" / f"{rel}.jsonl"),
        "--label-field",
        "obj_label",
        "--template",
        bc.LAMA_TEMPLATE,
    ]


def train(work: Path, trex: Path, model: Path, rel: str) -> Path:
    run = work / "runs" / rel
    if not (run / "ptedge.json").is_file():
        _cli(1, "train", *train_flags(trex, rel, model), "--force", "--out", str(run))
        bc.log(f"trained {rel}")
    return run


def grid_stats(scores: np.ndarray, gold: np.ndarray) -> dict:
    """Per fact, at every temperature of ``GRID``: the top probability and the gold's log
    probability; and whether the top token is the gold (the same at every temperature).
    scores: (N, V) raw; gold: (N,) token ids."""
    s = scores.astype(np.float64)  # (N, V)
    top = s.max(-1, keepdims=True)  # (N, 1)
    gold_s = s[np.arange(len(gold)), gold][:, None]  # (N, 1)
    conf, logp = [], []
    for t in GRID:
        logz = np.log(np.exp((s - top) / t).sum(-1, keepdims=True))  # (N, 1)
        conf.append(np.exp(-logz[:, 0]))
        logp.append(((gold_s - top) / t - logz)[:, 0])
    return {"conf": np.stack(conf, 1), "logp": np.stack(logp, 1), "ok": s.argmax(-1) == gold}


def score(p, rel: str, path: Path) -> dict:
    """Predictor ``p``'s raw scores of relation ``rel`` on the facts at ``path`` whose
    object is one token, as ``grid_stats``; with the bundle's temperature for ``rel``."""
    from ptedge.data import read_records
    from ptedge.targets import vocab_targets

    _, spec = p.task(rel)
    recs = read_records(path)
    targets = vocab_targets(recs, spec["label_field"], spec["template"], p.tokenizer)
    keep = [i for i, t in enumerate(targets) if t is not None]
    if keep:
        scores, _ = p.scores([recs[i] for i in keep], rel)
        stats = grid_stats(scores, np.asarray([targets[i] for i in keep]))
    else:
        empty = np.zeros((0, len(GRID)))
        stats = {"conf": empty, "logp": empty, "ok": np.zeros(0, bool)}
    return stats | {
        "n": len(keep),
        "skipped": len(recs) - len(keep),
        "T": (spec.get("calibration") or {}).get("temperature", 1.0),  # None: uncalibrated
    }


def at(stats: dict, t: float) -> np.ndarray:
    """Top probabilities at the grid temperature nearest ``t``."""
    return stats["conf"][:, int(np.argmin(np.abs(np.log(GRID) - np.log(t))))]


def ece_row(parts: list[tuple[dict, float]]) -> dict:
    """ECE of the test facts of every (stats, temperature) part together, and its floor."""
    from ptedge import calibration

    conf = np.concatenate([at(s, t) for s, t in parts])
    ok = np.concatenate([s["ok"] for s, _ in parts])
    return {"ece": calibration.ece(conf, ok), "floor": calibration.ece_floor(conf), "n": len(ok)}


def nll_fit(parts: list[dict]) -> float:
    """The grid temperature minimising the gold's NLL over every part's facts (1 if none)."""
    logp = np.concatenate([p["logp"] for p in parts])  # (N, G)
    return float(GRID[np.argmin(-logp.mean(0))]) if len(logp) else 1.0


def top_label_fit(s: dict) -> float:
    """The grid temperature minimising the log loss of the top probability as the
    probability that the top token is right."""
    if not len(s["ok"]):
        return 1.0
    c = np.clip(s["conf"], 1e-12, 1 - 1e-12)
    ok = s["ok"][:, None]
    return float(GRID[np.argmin(-(ok * np.log(c) + (~ok) * np.log(1 - c)).mean(0))])


def _take(stats: dict, idx: np.ndarray) -> dict:
    return {k: stats[k][idx] for k in ("conf", "logp", "ok")}


FITS = {  # temperature rule -> (per-relation dev stats -> per-relation temperature)
    "raw (T = 1)": lambda dev: dict.fromkeys(dev, 1.0),
    "per relation, NLL (shipped)": lambda dev: {r: nll_fit([s]) for r, s in dev.items()},
    "one for all relations, NLL": lambda dev: dict.fromkeys(dev, nll_fit(list(dev.values()))),
    "per relation, top-label log loss": lambda dev: {r: top_label_fit(s) for r, s in dev.items()},
}


def dev_crossfit(dev: dict) -> dict:
    """Each rule of ``FITS`` judged on dev facts only: every relation's dev facts split in
    two halves (seeded); temperatures fitted on one half, the ECE of the other half's facts
    at them, both ways round, all relations pooled."""
    rng = np.random.default_rng(0)
    halves = {}
    for r, s in dev.items():
        order = rng.permutation(len(s["ok"]))
        halves[r] = (order[: len(order) // 2], order[len(order) // 2 :])
    res = {}
    for name, fit in FITS.items():
        parts = []
        for a, b in ((0, 1), (1, 0)):
            temps = fit({r: _take(s, halves[r][a]) for r, s in dev.items()})
            parts += [(_take(s, halves[r][b]), temps[r]) for r, s in dev.items()]
        res[name] = ece_row(parts)
    return res


def summarise(rels: list[str], dev: dict, test: dict) -> dict:
    from ptedge import calibration

    per = {}
    for r in rels:
        s = test[r]
        per[r] = {
            "n": s["n"],
            "skipped": s["skipped"],
            "dev_n": dev[r]["n"],
            "p_at_1": float(s["ok"].mean()),
            "temperature": s["T"],
            "ece_raw": calibration.ece(at(s, 1.0), s["ok"]),
            "ece_calibrated": calibration.ece(at(s, s["T"]), s["ok"]),
            "floor": calibration.ece_floor(at(s, s["T"])),
        }
    pooled = {}
    for name, fit in FITS.items():
        temps = fit({r: dev[r] for r in rels})
        pooled[name] = ece_row([(test[r], temps[r]) for r in rels])
    pooled["per relation, the bundle's temperature"] = ece_row(
        [(test[r], test[r]["T"]) for r in rels]
    )
    return {
        "per_relation": per,
        "macro_p_at_1": float(np.mean([p["p_at_1"] for p in per.values()])),
        "pooled_test_ece": pooled,
        "dev_crossfit_ece": dev_crossfit({r: dev[r] for r in rels}),
    }


def _ece_table(rows: dict) -> list[str]:
    """Markdown rows: temperature rule, ECE, floor, n."""
    f = bc.fmt
    head = ["| temperature | ECE | floor | n |", "|---|---:|---:|---:|"]
    return head + [f"| {k} | {f(r['ece'])} | {f(r['floor'])} | {r['n']} |" for k, r in rows.items()]


def _guard_lines(q: dict | None) -> list[str]:
    """What the int8 guard measured on the relations' dev facts, for the report."""
    if not q:
        return []
    g, every = q["guard"], q.get("guard_all_tasks")
    past = [r for r, m in g.items() if 100 * (m["fp32_accuracy"] - m["quantized_accuracy"]) > 1]
    return [
        f"int8 recipe `{q['recipe']}`, kept by the guard at the default `--max-drop 1`: "
        + (
            f"over all {sum(m['data']['n'] for m in g.values())} scorable dev facts "
            f"{every['points']:+.2f} points ({every['lost']} lost, {every['gained']} gained, "
            f"p {every['p']:.3f}); "
            if every
            else ""
        )
        + f"{len(past)} relations past 1 point alone, each within chance: "
        + (
            ", ".join(
                f"{r} {g[r]['lost']}/{g[r]['gained']} of {g[r]['data']['n']} (p {g[r]['p']:.2f})"
                for r in past
            )
            or "none"
        )
        + " (facts lost/gained of the scorable dev facts).",
        "",
    ]


def markdown(result: dict) -> str:
    f = bc.fmt
    s = result["summary"]
    lines = [
        "# Calibrated confidence on LAMA, every relation",
        "",
        f"Machine: {bc.machine_line(result['machine'])}. `{result['command']}`, "
        f"{result['wall_s'] / 60:.0f} min (runs already under --work reused). Each relation: "
        f"`{result['train_command']}`; all in one {result['precision']} bundle, `ptedge export "
        f"RUN... --out B{' --quantize int8' if result['precision'] == 'int8' else ''}`; scored "
        "with the bundle on the relation's test facts whose object is one token. ECE: "
        "top-label, 15 bins; floor: the mean ECE of a perfectly calibrated "
        "model with the same confidences on as many facts (`ptedge.calibration.ece_floor`).",
        "",
        "## All test facts together",
        "",
        *_ece_table(s["pooled_test_ece"]),
        "",
        "The same temperature rules judged on dev facts alone (each relation's dev facts in "
        "two seeded halves; fitted on one, scored on the other, both ways round, pooled):",
        "",
        *_ece_table(s["dev_crossfit_ece"]),
        "",
        f"Macro precision@1 of the {result['precision']} bundle over "
        f"{len(s['per_relation'])} relations: "
        f"{f(s['macro_p_at_1'])}.",
        "",
        *_guard_lines(result.get("quantization")),
        "## Per relation",
        "",
        "| relation | test n (skipped) | dev n | P@1 | T | ECE raw → calibrated | floor |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r, p in s["per_relation"].items():
        lines.append(
            f"| {r} | {p['n']} ({p['skipped']}) | {p['dev_n']} | {f(p['p_at_1'])} | "
            f"{p['temperature']:.2f} | {f(p['ece_raw'])} → {f(p['ece_calibrated'])} | "
            f"{f(p['floor'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from ptedge.backbones import fetch
    from ptedge.runtime import Predictor

    ap = bench_defaults.study_parser(__doc__, "lama_calibration")
    ap.add_argument("--relations", default="all", help="comma-separated, or all (default)")
    ap.add_argument(
        "--precision",
        choices=("int8", "fp32"),
        default="int8",
        help="the bundle scored: int8 (default) or fp32",
    )
    a = ap.parse_args(argv)
    trex = bc.need_data("trex")
    known = [json.loads(x)["relation"] for x in (trex / "relations.jsonl").read_text().splitlines()]
    rels = known if a.relations == "all" else a.relations.split(",")
    unknown = [r for r in rels if r not in known]
    if unknown:
        sys.exit(f"--relations: unknown {unknown} (trex has {', '.join(known)})")
    t0 = time.perf_counter()
    work, model = Path(a.work), fetch("smollm2-135m", quiet=True)
    with ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda r: train(work, trex, model, r), rels))
    bundle = work / a.precision
    quantize = ["--quantize", "int8"] if a.precision == "int8" else []
    if not (bundle / "ptedge.json").is_file():
        _cli(2, "export", *map(str, runs), "--out", str(bundle), *quantize, "--force")
    p = Predictor(bundle, threads=2)
    dev = {r: score(p, r, trex / "dev" / f"{r}.jsonl") for r in rels}
    test = {r: score(p, r, trex / "test" / f"{r}.jsonl") for r in rels}
    command = "python tools/bench_lama_calibration.py" + (
        f" --relations {a.relations}" if a.relations != "all" else ""
    )
    command += " --precision fp32" if a.precision == "fp32" else ""
    shown = bench_quality._shown(train_flags(trex, "REL", model))
    result = {
        "benchmark": "lama_calibration",
        "command": command,
        "train_command": "ptedge train " + " ".join(shown),
        "machine": bc.machine(),
        "relations": rels,
        "precision": a.precision,
        "summary": summarise(rels, dev, test),
        "quantization": json.loads((bundle / "ptedge.json").read_text())["quantization"],
        "wall_s": time.perf_counter() - t0,
    }
    name = f"lama_calibration_{a.precision}"
    bc.write_report(Path(a.out), name, result, markdown(result))
    bc.log(f"wrote {Path(a.out) / name}.json and {name}.md")


if __name__ == "__main__":
    main()
