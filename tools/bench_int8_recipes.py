"""Today's int8 recipe against the one it replaced, on one trained encoder bundle.

For issue 13's goals ("accuracy and batch-1 speed no worse than today's recipes"): the
``static`` int8 bundle ``ptedge export --quantize int8`` writes for an encoder, against
the previous recipe (``all``: onnxruntime's dynamic quantization, one activation scale
per batch) rebuilt from the same fp32 bundle (``bench_speed.previous_int8``). Both are
measured in one process, taking turns:

- test accuracy (``Predictor.evaluate``, whole test file);
- batch independence: labels changed and largest score change between batch sizes 1 and
  32 on the first 400 test records;
- batch-1 latency of ``Predictor.predict``: p50 / p90 over rounds of 100 records, the
  bundles alternating round by round.

    python tools/bench_int8_recipes.py --fp32 B_FP32 --int8 B_INT8 \\
        --model models/minilm-l6 --data ../shared/data/banking77/test.csv --out res.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
from bench_speed import previous_int8  # noqa: E402

from ptedge.data import read_records  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402


def batch_change(p: Predictor, records: list[dict]) -> dict:
    """Labels that differ between batch sizes 1 and 32, and the largest score change."""
    one, _ = p.scores(records, batch_size=1)
    many, _ = p.scores(records, batch_size=32)
    return {
        "labels_changed": int((one.argmax(-1) != many.argmax(-1)).sum()),
        "max_score_change": float(abs(one - many).max()),
        "n": len(records),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="the fp32 bundle of the run")
    ap.add_argument("--int8", required=True, help="its `ptedge export --quantize int8` bundle")
    ap.add_argument("--model", required=True, help="the backbone folder (encoder shape)")
    ap.add_argument("--data", required=True, help="labelled test records")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    records = list(read_records(a.data))
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "int8-all"
        previous_int8(Path(a.fp32), old, Path(a.model))
        systems = {
            "static (today)": Predictor(a.int8, threads=a.threads),
            "all (previous, dynamic)": Predictor(old, threads=a.threads),
        }
        res = {name: {} for name in systems}
        for name, p in systems.items():
            bc.log(f"{name}: accuracy, batch independence")
            res[name]["test"] = p.evaluate(records)
            res[name]["batch_1_vs_32"] = batch_change(p, records[:400])
            res[name]["bytes"] = bc.folder_bytes(p.bundle)
        times = {name: [] for name in systems}
        sample = records[:100]
        for p in systems.values():  # warm-up
            p.predict(sample[:10], batch_size=1)
        for r in range(a.rounds):
            for name, p in systems.items():
                for rec in sample:
                    t0 = time.perf_counter()
                    p.predict([rec], batch_size=1)
                    times[name].append(1000 * (time.perf_counter() - t0))
            bc.log(f"round {r + 1}/{a.rounds}")
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=10)
            res[name]["batch1_ms"] = {"p50": statistics.median(ts), "p90": q[8], "n": len(ts)}
    new, prev = res["static (today)"], res["all (previous, dynamic)"]
    result = {
        "machine": bc.machine(),
        "command": " ".join(sys.argv),
        "systems": res,
        "p50_speedup": prev["batch1_ms"]["p50"] / new["batch1_ms"]["p50"],
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    for name, r in res.items():
        print(
            f"{name}: test acc {r['test']['accuracy']:.4f}, batch 1 vs 32: "
            f"{r['batch_1_vs_32']['labels_changed']}/400 labels, max score change "
            f"{r['batch_1_vs_32']['max_score_change']:.2e}, batch-1 p50 "
            f"{r['batch1_ms']['p50']:.2f} ms, p90 {r['batch1_ms']['p90']:.2f} ms, "
            f"{r['bytes'] / 1e6:.1f} MB"
        )
    print(f"previous p50 / static p50: {result['p50_speedup']:.2f}x")


if __name__ == "__main__":
    main()
