"""How closely an encoder's int8 bundle follows its fp32 graph, with and without the
``static`` recipe's float outlier channels (``ptedge.export.outlier_channels``).

For each trained run given: ``ptedge export RUN`` (fp32), ``ptedge export RUN --quantize
int8`` (today's ``static``), and the same recipe with every channel in int8 (the recipe
before outlier channels: ``outlier_channels.FACTOR`` set to infinity in this process).
Each bundle is scored on the run's test file and on its dev split (the int8 guard's
records): accuracy, labels that differ from the fp32 bundle's ("flips"), and the mean
KL divergence of the int8 probabilities from the fp32 ones (temperature 1). Then the two
int8 bundles' batch-1 latency (``Predictor.scores``, one thread), taking turns round by
round in this process.

    python tools/bench_int8_fidelity.py \\
        --run runs/bench/seeds/runs/clinc150-s0 ../shared/data/clinc150/test.csv

Writes docs/results/int8_fidelity.{json,md}; bundles go under ``--work``.

Not for: choosing a recipe (the export's guard does), other backbones' recipes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import numpy as np  # noqa: E402

from ptedge import cli  # noqa: E402
from ptedge.calibration import probabilities  # noqa: E402
from ptedge.data import read_records  # noqa: E402
from ptedge.export import outlier_channels  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.targets import class_targets  # noqa: E402

LATENCY_RECORDS = 100  # per round


def export(run: Path, out: Path, *flags: str, factor: float = outlier_channels.FACTOR) -> Path:
    """``ptedge export RUN --out OUT FLAGS`` in this process with ``FACTOR`` = ``factor``."""
    if not (out / "ptedge.json").is_file():
        before, outlier_channels.FACTOR = outlier_channels.FACTOR, factor
        try:
            cli.main(
                ["export", str(run), "--out", str(out), "--force", *flags], standalone_mode=False
            )
        finally:
            outlier_channels.FACTOR = before
    return out


def fidelity(bundles: dict[str, Path], path: str) -> dict:
    """Per bundle: accuracy on the labelled records at ``path``, flips and mean KL from
    the first bundle (fp32)."""
    records = list(read_records(path))
    res, ref = {}, None
    for name, b in bundles.items():
        p = Predictor(b, threads=1)
        _, spec = p.task(None)
        gold = np.array(class_targets(read_records(path), spec["label_field"], spec["labels"]))
        scores, _ = p.scores(records)  # (N, L)
        prob, pred = probabilities(scores), scores.argmax(-1)
        if ref is None:
            ref = (prob, pred)
        kl = np.sum(ref[0] * (np.log(ref[0] + 1e-12) - np.log(prob + 1e-12)), -1)  # (N,)
        res[name] = {
            "accuracy": float((pred == gold).mean()),
            "flips": int((pred != ref[1]).sum()),
            "kl": float(kl.mean()),
            "n": len(records),
        }
    return res


def latency(bundles: dict[str, Path], path: str, rounds: int) -> dict:
    """Batch-1 ``scores`` latency (ms; p50 and p90), the bundles taking turns by round."""
    records = list(read_records(path))[:LATENCY_RECORDS]
    ps = {k: Predictor(b, threads=1) for k, b in bundles.items()}
    times: dict[str, list[float]] = {k: [] for k in ps}
    for p in ps.values():
        p.scores(records[:10], batch_size=1)
    for _ in range(rounds):
        for k, p in ps.items():
            for r in records:
                t0 = time.perf_counter()
                p.scores([r], batch_size=1)
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {
        k: {"p50": statistics.median(t), "p90": bc.percentile(t, 90), "n": len(t)}
        for k, t in times.items()
    }


def markdown(result: dict) -> str:
    f = bc.fmt
    lines = [
        "# int8 against fp32, with and without float outlier channels",
        "",
        f"Machine: {bc.machine_line(result['machine'])}. `{result['command']}`. Each run: "
        "its fp32 bundle, its int8 bundle (`static`, outlier channels in float) and the same "
        "recipe with every channel in int8 (the recipe before them). Flips: labels that differ "
        "from fp32's; KL: mean KL(fp32 ‖ int8) of the probabilities at temperature 1.",
        "",
        "| run | split (n) | fp32 | int8, all channels | int8, outliers in float | flips | "
        "KL × 1000 |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for name, r in result["runs"].items():
        for split in ("test", "dev"):
            s = r[split]
            a, b = s["int8_all_channels"], s["int8"]
            lines.append(
                f"| {name} | {split} ({s['fp32']['n']}) | {f(s['fp32']['accuracy'], 4)} | "
                f"{f(a['accuracy'], 4)} | {f(b['accuracy'], 4)} | {a['flips']} → {b['flips']} | "
                f"{1e3 * a['kl']:.2f} → {1e3 * b['kl']:.2f} |"
            )
    lines += ["", "Batch-1 latency, one thread (ms, p50 / p90; the two bundles taking turns):", ""]
    for name, r in result["runs"].items():
        a, b = r["latency"]["int8_all_channels"], r["latency"]["int8"]
        lines.append(
            f"- {name}: all channels {a['p50']:.2f} / {a['p90']:.2f}, outliers in float "
            f"{b['p50']:.2f} / {b['p90']:.2f} (p50 ratio {b['p50'] / a['p50']:.3f})"
        )
    note = bc.busy_note(result["machine"])
    return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        nargs=2,
        action="append",
        required=True,
        metavar=("RUN", "TEST"),
        help="a trained encoder run with a linear head, and its labelled test file",
    )
    ap.add_argument("--work", default=str(bc.ROOT / "runs" / "bench" / "int8_fidelity"))
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (default 5)")
    a = ap.parse_args()
    mark = bc.cpu_mark()
    runs = {}
    for run, test in a.run:
        run = Path(run)
        cfg = json.loads((run / "ptedge.json").read_text())
        dev = cfg.get("dev_file")
        if not dev:
            sys.exit(f"{run}: the run has no dev split")
        dev = str(dev if Path(dev).is_absolute() else run / dev)
        w = Path(a.work) / run.name
        bundles = {
            "fp32": export(run, w / "fp32"),
            "int8_all_channels": export(
                run, w / "int8-all", "--quantize", "int8", factor=float("inf")
            ),
            "int8": export(run, w / "int8", "--quantize", "int8"),
        }
        int8s = {k: bundles[k] for k in ("int8_all_channels", "int8")}
        runs[run.name] = {
            "test_file": test,
            "float_channels": json.loads((bundles["int8"] / "ptedge.json").read_text())[
                "quantization"
            ]["float_channels"],
            "test": fidelity(bundles, test),
            "dev": fidelity(bundles, dev),
            "latency": latency(int8s, test, a.rounds),
        }
        bc.log(f"{run.name}: {runs[run.name]['test']}")
    machine = bc.machine()
    machine["others_cpu_share"] = bc.others_cpu_share(mark)
    shown = " ".join(f"--run {r} {t}" for r, t in a.run).replace(str(bc.DATA), "../shared/data")
    rounds = f"--rounds {a.rounds} " if a.rounds != 5 else ""
    result = {
        "benchmark": "int8_fidelity",
        "command": f"python tools/bench_int8_fidelity.py {rounds}{shown}",
        "machine": machine,
        "runs": runs,
    }
    bc.write_report(Path(a.out), "int8_fidelity", result, markdown(result))


if __name__ == "__main__":
    main()
