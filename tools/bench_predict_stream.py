"""Measure `ptedge predict`'s streaming goals: memory, throughput, first line.

Goals (issue 13), on generated records (BANKING77 sentences, cycled):
- peak RSS on N records (default 1,000,000) at most 50 MB above that on 10,000;
- throughput within 10% of ``Predictor.predict`` called in batches, same threads (both
  ways below; the goal counts the worse ratio);
- the first output line within a second of starting the command.

Memory and first line: ``ptedge predict`` runs as a user runs it, in a child process
whose stdout this tool reads; the child reports its peak RSS (VmHWM) and this tool
samples its RSS as the records go by. Throughput: the stream (``predict_stream``, file
in, JSON lines out) against ``Predictor.predict`` on the same ``--baseline`` records with
one Predictor, in alternating rounds: ``per_batch`` calls it once per batch of records
held in memory, ``one_call`` once on them all (every record sorted by length).

``--bundle tiny`` builds a tiny random GPT-2 bundle (fast: a million records in minutes,
to measure memory); a real bundle (e.g. MiniLM BANKING77 int8) measures throughput at a
size this machine can afford. Results go to ``--out`` as JSON.

    python tools/bench_predict_stream.py --bundle tiny --records 1000000
    python tools/bench_predict_stream.py --bundle BUNDLE --records 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

CHILD = r"""
import json, re, sys
from ptedge.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
status = open("/proc/self/status").read()
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
sys.stderr.write("\nBENCH " + json.dumps({"code": code, "peak_rss_mb": hwm / 1024}) + "\n")
"""
SAMPLE_S = 2.0  # seconds between RSS samples of the child


def texts() -> list[str]:
    from ptedge.data import read_records

    b77 = bc.need_data("banking77")
    recs = read_records(b77 / "train.csv") + read_records(b77 / "test.csv")
    out = [r["text"] for r in recs]
    random.Random(0).shuffle(out)
    return out


def write_records(path: Path, n: int, field: str, pool: list[str]) -> Path:
    if path.is_file() and sum(1 for _ in path.open("rb")) == n:
        return path
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({field: pool[i % len(pool)], "id": i}) + "\n")
    return path


def tiny_bundle(work: Path) -> Path:
    """A tiny random GPT-2 (tests/conftest.py) with a 2-label prompt on field ``text``."""
    bundle = work / "tiny-bundle"
    if (bundle / "ptedge.json").is_file():
        return bundle
    sys.path.insert(0, str(bc.ROOT / "tests"))
    from conftest import build_tiny, write_jsonl

    from ptedge.export import ExportArgs, export
    from ptedge.train import TrainArgs, train

    model = build_tiny("gpt2", work / "tiny-gpt2")
    pool = texts()[:40]
    data = write_jsonl(
        work / "tiny-train.jsonl", [{"text": t, "label": str(i % 2)} for i, t in enumerate(pool)]
    )
    run = work / "tiny-run"
    train(
        TrainArgs(
            model=str(model),
            train=str(data),
            template="[P:2] {text} [P:2] It was [MASK]",
            verbalizer={"0": "bad", "1": "good"},
            out=str(run),
            steps=2,
            batch_size=4,
            force=True,
        ),
        progress=False,
    )
    export(ExportArgs(runs=[str(run)], out=str(bundle), force=True))
    return bundle


def _rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(m.group(1)) / 1024 if m else None


def stream(bundle: Path, data: Path, n: int, threads: int, batch: int) -> dict:
    """Run `ptedge predict` on ``data`` in a child; time its lines, sample its memory."""
    cmd = [sys.executable, "-c", CHILD, "predict", str(bundle), "--input", str(data)]
    cmd += ["--threads", str(threads), "--batch-size", str(batch), "--no-progress"]
    env = os.environ | {"PYTHONPATH": str(bc.ROOT)}
    mark = bc.cpu_mark()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lines, first, samples, last = 0, None, [], t0
    while chunk := child.stdout.read1(1 << 16):
        now = time.perf_counter()
        if first is None:
            first = now - t0
        lines += chunk.count(b"\n")
        if now - last >= SAMPLE_S:
            samples.append((lines, _rss_mb(child.pid)))
            last = now
    err = child.stderr.read().decode()
    child.wait()
    wall = time.perf_counter() - t0
    found = re.search(r"BENCH (\{.*\})", err)
    if child.returncode or found is None or json.loads(found.group(1))["code"]:
        sys.exit(f"ptedge predict failed on {data}:\n{err[-3000:]}")
    if lines != n:
        sys.exit(f"ptedge predict wrote {lines} lines for {n} records")
    return {
        "records": n,
        "wall_s": round(wall, 2),
        "first_line_s": round(first, 3),
        "records_per_s": round((n - 1) / (wall - first), 1),  # after the first line
        "peak_rss_mb": round(json.loads(found.group(1))["peak_rss_mb"], 1),
        "rss_mb_by_records": [[k, round(r, 1)] for k, r in samples if r is not None],
        "others_cpu_share": bc.others_cpu_share(mark),
    }


def throughput(bundle: Path, data: Path, threads: int, batch: int, rounds: int) -> dict:
    """records/s of the stream against Predictor.predict on the same records and one
    Predictor, in alternating rounds (one machine slowing down slows all three alike).

    ``stream``: ``predict_stream`` reading ``data`` and writing JSON lines to /dev/null;
    ``per_batch``: ``predict`` called once per batch of records already in memory;
    ``one_call``: ``predict`` called once on them all (every record sorted by length).
    """
    import statistics

    from ptedge.data import RecordReader, read_records
    from ptedge.runtime import Predictor
    from ptedge.stream import predict_stream

    recs = read_records(data)
    p = Predictor(bundle, threads=threads)
    p.predict(recs[:batch], batch_size=batch)  # warm-up

    def run_stream():
        with RecordReader(data) as reader, open(os.devnull, "w") as out:
            predict_stream(p, reader, out, batch_size=batch)

    ways = {
        "stream": run_stream,
        "per_batch": lambda: [
            p.predict(recs[i : i + batch], batch_size=batch) for i in range(0, len(recs), batch)
        ],
        "one_call": lambda: p.predict(recs, batch_size=batch),
    }
    rates: dict[str, list[float]] = {k: [] for k in ways}
    mark = bc.cpu_mark()
    for r in range(rounds):
        for name in list(ways)[r % 3 :] + list(ways)[: r % 3]:  # rotate the order
            t = time.perf_counter()
            ways[name]()
            rates[name].append(round(len(recs) / (time.perf_counter() - t), 1))
        bc.log(f"round {r + 1}: {rates}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "records": len(recs),
        "records_per_s": rates,
        "stream_over_per_batch": round(med["stream"] / med["per_batch"], 3),
        "stream_over_one_call": round(med["stream"] / med["one_call"], 3),
        "others_cpu_share": bc.others_cpu_share(mark),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="A bundle folder, or 'tiny' to build one.")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=10_000, help="The memory reference run.")
    ap.add_argument("--baseline", type=int, default=5_000, help="Records per throughput round.")
    ap.add_argument("--rounds", type=int, default=3, help="Throughput rounds.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default=str(bc.ROOT / "runs" / "bench" / "predict-stream"))
    ap.add_argument("--out", help="Result JSON (default: WORK/result-<bundle name>.json).")
    a = ap.parse_args()

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = tiny_bundle(work) if a.bundle == "tiny" else Path(a.bundle)
    from ptedge.runtime import Predictor
    from ptedge.template import record_fields

    (field,) = record_fields(Predictor(bundle).task(None)[1]["template"])
    pool = texts()
    small = write_records(work / f"records-{a.small}.jsonl", a.small, field, pool)
    large = write_records(work / f"records-{a.records}.jsonl", a.records, field, pool)
    base = write_records(work / f"records-{a.baseline}.jsonl", a.baseline, field, pool)
    result = {"machine": bc.machine(), "bundle": str(bundle), "threads": a.threads}
    result["batch_size"] = a.batch_size
    bc.log(f"throughput, {a.rounds} rounds on {a.baseline:,} records")
    result["throughput"] = throughput(bundle, base, a.threads, a.batch_size, a.rounds)
    bc.log(f"ptedge predict on {a.small:,} records")
    result["stream_small"] = stream(bundle, small, a.small, a.threads, a.batch_size)
    bc.log(f"ptedge predict on {a.records:,} records")
    result["stream_large"] = stream(bundle, large, a.records, a.threads, a.batch_size)

    s, big, tp = result["stream_small"], result["stream_large"], result["throughput"]
    worst = min(tp["stream_over_per_batch"], tp["stream_over_one_call"])
    result["goals"] = {
        "rss_growth_mb": round(big["peak_rss_mb"] - s["peak_rss_mb"], 1),
        "rss_growth_ok": big["peak_rss_mb"] - s["peak_rss_mb"] <= 50,
        "stream_over_predict": worst,
        "throughput_ok": worst >= 0.9,
        "first_line_s": big["first_line_s"],
        "first_line_ok": big["first_line_s"] <= 1.0,
    }
    out = Path(a.out) if a.out else work / f"result-{bundle.name}.json"
    bc.write_json(out, result)
    print(json.dumps(result["goals"]))
    bc.log(f"wrote {out}")


if __name__ == "__main__":
    main()
