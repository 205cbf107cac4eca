"""Batch scoring with Ray Data: 10,000 BANKING77 records, 1 actor against 2, and a serial run.

On the MiniLM BANKING77 bundles (tools/_b77_bundles.py: the tests' recipe), the first
``--n`` records of BANKING77's train split (10,003 rows) are scored on a local Ray
(``ray.init(num_cpus=2)``) by ``ptedge.integrations.ray.score_dataset`` with 1 actor x 1
thread and with 2 actors x 1 thread, and serially by one ``Predictor(threads=1)`` in this
process. Two settings:

- ``fp32``, 32 records per onnxruntime run: fp32 answers do not depend on the batch;
- ``int8``, 1 record per run: int8 bundles quantize activations per run, so only runs of
  one record give answers that do not depend on how Ray cut the data.

Labels must be identical to the serial run's (joined on an id column). Throughput is
records / wall seconds from submitting the dataset to the last row back (actor start-up
included; ``ray.init`` not), after a small warm-up dataset. The configurations take turns
over ``--rounds`` rounds; the median is reported.

    python tools/bench_ray.py                 # docs/results/ray.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _b77_bundles import banking77_bundles  # noqa: E402
from _bench_common import (  # noqa: E402
    busy_note,
    cpu_mark,
    log,
    machine,
    machine_line,
    need_data,
    others_cpu_share,
)

from ptedge.data import read_records  # noqa: E402
from ptedge.integrations.ray import score_dataset  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402

SETTINGS = {"fp32": 32, "int8": 1}  # bundle -> records per onnxruntime run
RAY_BATCH = 500  # records per actor call


def ray_run(ray, bundle: Path, records: list[dict], actors: int, model_batch: int) -> dict:
    ds = ray.data.from_items(records)
    t0 = time.perf_counter()
    rows = score_dataset(
        ds, bundle, concurrency=actors, threads=1, batch_size=RAY_BATCH,
        model_batch_size=model_batch,
    ).take_all()  # fmt: skip
    wall = time.perf_counter() - t0
    by_id = {r["id"]: r["pred_label"] for r in rows}
    return {"wall_s": wall, "labels": [by_id.get(r["id"]) for r in records]}


def serial_run(bundle: Path, records: list[dict], model_batch: int) -> dict:
    t0 = time.perf_counter()
    p = Predictor(bundle, threads=1)
    res = p.predict(records, batch_size=model_batch)
    return {"wall_s": time.perf_counter() - t0, "labels": [r["label"] for r in res]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="records (BANKING77 train rows)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settings", default="fp32,int8", help="comma-separated subset")
    ap.add_argument("--out", default="docs/results", help="folder for ray.json/.md")
    ap.add_argument("--work", default="runs/bench/b77", help="built run and bundles")
    ap.add_argument("--fresh", action="store_true", help="rebuild the bundles")
    args = ap.parse_args(argv)
    import ray

    bundles = banking77_bundles(Path(args.work), args.fresh)
    rows = read_records(need_data("banking77", "train.csv"))[: args.n]
    records = [{"id": i, "text": r["text"]} for i, r in enumerate(rows)]
    m = machine()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log("warm-up: 200 records on 2 actors")
    ray_run(ray, bundles["fp32"], records[:200], 2, 32)
    mark = cpu_mark()
    results = {}
    for setting in args.settings.split(","):
        bundle, mb = bundles[setting], SETTINGS[setting]
        runs = {"serial": [], "ray-1x1": [], "ray-2x1": []}
        configs = {
            "serial": lambda b=bundle, k=mb: serial_run(b, records, k),
            "ray-1x1": lambda b=bundle, k=mb: ray_run(ray, b, records, 1, k),
            "ray-2x1": lambda b=bundle, k=mb: ray_run(ray, b, records, 2, k),
        }
        names = list(configs)
        for k in range(args.rounds):
            for name in names[k % 3 :] + names[: k % 3]:
                log(f"{setting} round {k + 1}/{args.rounds}: {name}")
                runs[name].append(configs[name]())
        serial = runs["serial"][0]["labels"]
        res = {"model_batch_size": mb, "n": len(records)}
        for name, rs in runs.items():
            walls = [r["wall_s"] for r in rs]
            res[name] = {
                "wall_s_per_round": [round(w, 2) for w in walls],
                "records_per_s": round(len(records) / statistics.median(walls), 1),
                "labels_identical_to_serial": sum(
                    a == b for r in rs[:1] for a, b in zip(r["labels"], serial, strict=True)
                ),
            }
        res["speedup_2x1_over_1x1"] = round(
            res["ray-2x1"]["records_per_s"] / res["ray-1x1"]["records_per_s"], 2
        )
        results[setting] = res
    m["others_cpu_share"] = others_cpu_share(mark)
    ray.shutdown()
    out = {"machine": m, "rounds": args.rounds, "ray": ray.__version__, "settings": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ray.json").write_text(json.dumps(out, indent=1) + "\n")
    (Path(args.out) / "ray.md").write_text(render(out))
    print(render(out))


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Batch scoring with Ray Data: one actor against two",
        "",
        "Generated by `python tools/bench_ray.py`; numbers from the run below.",
        f"Machine: {machine_line(m)}; Ray {res['ray']}, `ray.init(num_cpus=2)`.",
        "MiniLM BANKING77 bundles (the tests' recipe); records: BANKING77 train rows; "
        f"median over {res['rounds']} rounds; wall time includes actor start-up.",
        "",
        "| bundle | records per onnxruntime run | system | records/s | labels identical "
        "to serial |",
        "|---|---|---|---|---|",
    ]
    names = {
        "serial": "serial `Predictor(threads=1)`",
        "ray-1x1": "Ray, 1 actor x 1 thread",
        "ray-2x1": "Ray, 2 actors x 1 thread",
    }
    for setting, r in res["settings"].items():
        for key, label in names.items():
            lines.append(
                f"| {setting} | {r['model_batch_size']} | {label} | {r[key]['records_per_s']} "
                f"| {r[key]['labels_identical_to_serial']}/{r['n']} |"
            )
    lines.append("")
    for setting, r in res["settings"].items():
        lines.append(
            f"- {setting}: 2 actors ÷ 1 actor = **{r['speedup_2x1_over_1x1']}x** "
            f"(wall s per round: 1x1 {r['ray-1x1']['wall_s_per_round']}, "
            f"2x1 {r['ray-2x1']['wall_s_per_round']})."
        )
    lines.append("")
    note = busy_note(m)
    if note:
        lines += [note, ""]
    lines.append(f"Other processes' share of the CPU during the run: {m['others_cpu_share']:.0%}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
