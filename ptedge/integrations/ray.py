"""Batch scoring of a bundle with Ray Data: one ``Predictor`` per actor, any cluster size.

``score_dataset(ds, bundle)`` maps a Ray Dataset through ``BundleScorer`` actors (each opens
its own onnxruntime session: sessions are not serialisable, so they are opened in the
actor), and ``score_files(input, output, bundle)`` reads JSONL/CSV/Parquet files, scores
them and writes the same format. Each output row keeps its input columns and gains
``pred_label`` and ``pred_score`` (``pred_label`` is null where the bundle rejects the
record), ``pred_token_id`` for open-vocabulary tasks and ``pred_truncated`` (field tokens
dropped). Row order is not kept: carry an id column to join results back.

Each actor reserves ``threads`` CPUs from Ray and gives onnxruntime as many threads, so
``concurrency`` actors never oversubscribe the cores Ray knows about. The same code runs on
a laptop (``ray.init(num_cpus=2)``) and on a cluster (``ray start --head`` on one node,
``ray start --address HEAD:6379`` on the others, then ``RAY_ADDRESS=HEAD:6379``): there, the
bundle and the input/output paths must be reachable at the same path on every node (a
shared file system), and ptedge installed on each.

Ray is imported only inside the functions that use it; ``BundleScorer`` itself needs only
the runtime. Not responsible for: encoding or scoring (``ptedge.runtime``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ptedge.runtime import Predictor, load_manifest
from ptedge.template import record_fields

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
PREFIX = "pred_"  # output column names: pred_label, pred_score, ...
RAY_BATCH_SIZE = 512  # records handed to an actor per call
# Writing files reserves no CPU, like reading (read_dataset): the actors may hold them all.
IO_REMOTE_ARGS = {"num_cpus": 0}


def _need_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "ptedge.integrations.ray needs Ray Data: pip install 'ptedge[ray]'"
        ) from None
    return ray


class BundleScorer:
    """A Ray Data callable class: opens one Predictor, scores batches of columns.

    ``__call__`` takes a batch as ``{column: array (n,)}`` and returns it with the
    prediction columns added; the template's fields must be columns.
    """

    def __init__(
        self,
        bundle: str,
        task: str | None = None,
        threads: int = 1,
        model_batch_size: int = 32,
    ):
        self.predictor = Predictor(bundle, threads=threads)
        self.task, self.spec = self.predictor.task(task)
        self.fields = record_fields(self.spec["template"])
        self.model_batch_size = model_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        taken = [c for c in batch if c.startswith(PREFIX)]
        if taken:
            raise ValueError(f"input has column {taken[0]!r}: the {PREFIX}* names are outputs")
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise ValueError(f"input has no column {missing[0]!r} (the template needs it)")
        n = len(batch[self.fields[0]])
        records = [{f: batch[f][i] for f in self.fields} for i in range(n)]
        results = self.predictor.predict(records, self.task, self.model_batch_size)
        out = dict(batch)
        out[PREFIX + "label"] = np.array([r["label"] for r in results], dtype=object)
        out[PREFIX + "score"] = np.array([r["score"] for r in results], dtype=np.float64)
        if self.spec["kind"] == "vocab":
            out[PREFIX + "token_id"] = np.array([r["token_id"] for r in results], np.int64)
        out[PREFIX + "truncated"] = np.array([r.get("truncated", 0) for r in results], np.int64)
        return out


def score_dataset(
    ds,
    bundle: str | Path,
    task: str | None = None,
    concurrency: int | None = None,
    threads: int = 1,
    batch_size: int = RAY_BATCH_SIZE,
    model_batch_size: int = 32,
):
    """``ds`` with prediction columns added, computed lazily by ``concurrency`` actors.

    ``concurrency``: actors (default: the cluster's CPUs // ``threads``); ``threads``:
    CPUs reserved per actor and onnxruntime threads in it; ``batch_size``: records per
    actor call; ``model_batch_size``: records per onnxruntime run (int8 bundles
    quantize activations per run, so results can depend on it; see the bundle format).
    """
    ray = _need_ray()
    bundle = str(Path(bundle).resolve())
    if concurrency is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        concurrency = max(1, cpus // threads)
    return ds.map_batches(
        BundleScorer,
        fn_constructor_kwargs={
            "bundle": bundle,
            "task": task,
            "threads": threads,
            "model_batch_size": model_batch_size,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=threads,
        batch_size=batch_size,
        batch_format="numpy",
    )


def input_files(source: str) -> tuple[list[str], str]:
    """(files, format) of a file, a folder (its files of one format) or a glob pattern."""
    if os.path.isdir(source):
        files = sorted(
            str(p) for p in Path(source).iterdir() if p.is_file() and p.suffix.lower() in FORMATS
        )
    elif any(ch in source for ch in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
    else:
        if not os.path.isfile(source):
            raise ValueError(f"{source}: no such file or folder")
        files = [source]
    if not files:
        raise ValueError(f"{source}: no input files (.jsonl, .csv, .parquet)")
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise ValueError(f"{bad}: unsupported file type; supported: .jsonl, .csv, .parquet")
    if len(kinds) != 1:
        raise ValueError(f"{source}: files of several formats ({sorted(kinds)}); use one")
    return files, kinds.pop()


def _read_file(batch: dict[str, np.ndarray], fmt: str, fields: list[str]):
    """One input file (a batch of one path) as a pyarrow Table, its template fields
    checked: present, and no nulls (the error names the file and the record)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv, json, parquet

    path = str(batch["path"][0])
    try:
        if fmt == "jsonl":
            table = json.read_json(path)
        elif fmt == "csv":
            types = {f: pa.string() for f in fields}  # text, as ptedge.data reads CSV
            table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types=types))
        else:
            table = parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot read it as {fmt} ({e})") from None
    for f in fields:
        if f not in table.column_names:
            raise ValueError(f"{path}: no field {f!r} (the template needs it)")
        if table[f].null_count:
            row = pc.index(pc.is_null(table[f]), True).as_py()
            raise ValueError(f"{path}: record {row + 1} has no value for field {f!r}")
    return table


def read_dataset(files: list[str], fmt: str, fields: list[str]):
    """A Ray Dataset of the files, one read task per file. Reads reserve no CPU: the
    scoring actors may hold every CPU (measured with Ray 2.60: its own readers' 1-CPU
    tasks, such as Parquet's file listing, then waited forever)."""
    ray = _need_ray()
    return ray.data.from_items([{"path": f} for f in files]).map_batches(
        _read_file,
        fn_kwargs={"fmt": fmt, "fields": fields},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0,
    )


def _write(ds, fmt: str, path: str) -> None:
    write = {"jsonl": ds.write_json, "csv": ds.write_csv, "parquet": ds.write_parquet}[fmt]
    write(path, ray_remote_args=IO_REMOTE_ARGS)


def score_files(
    source: str,
    output: str,
    bundle: str | Path,
    task: str | None = None,
    output_format: str | None = None,
    **kw,
) -> str:
    """Score ``source`` (a file, folder or glob of .jsonl/.csv/.parquet) into the folder
    ``output``, written whole or not at all, in ``output_format`` (default: the input's).
    ``kw`` goes to ``score_dataset``. Returns the output folder."""
    _need_ray()
    files, fmt = input_files(source)
    output_format = output_format or fmt
    if output_format not in ("jsonl", "csv", "parquet"):
        raise ValueError(f"output format {output_format!r}: choose jsonl, csv or parquet")
    manifest = load_manifest(bundle, verify=False)
    names = list(manifest["tasks"])
    name = task if task is not None else (names[0] if len(names) == 1 else None)
    if name not in manifest["tasks"]:
        raise ValueError(f"bundle has tasks {names}: choose one with --task")
    fields = record_fields(manifest["tasks"][name]["template"])
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{output}: exists and is not an empty folder")
    scored = score_dataset(read_dataset(files, fmt, fields), bundle, name, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        _write(scored, output_format, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _user_error(e: BaseException) -> str | None:
    """The message of a ValueError raised in a Ray worker: Ray re-raises it as its own
    exception type, with the worker's traceback as text."""
    found = re.findall(r"^ValueError: (.+)$", str(e), flags=re.M)
    return found[-1] if found else None


def predict_command(
    bundle: str,
    task: str | None,
    source: str,
    output: str | None,
    model_batch_size: int,
    concurrency: int | None,
    threads: int,
) -> str:
    """``ptedge predict --engine ray``: connect to ``RAY_ADDRESS`` (or start a local Ray),
    score ``source`` into ``output``; user errors come back as one ``ValueError``."""
    if source == "-" or not output:
        raise ValueError("--engine ray reads files and writes a folder: give --input and --output")
    if threads < 1:
        raise ValueError("--actor-threads must be at least 1")
    ray = _need_ray()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        return score_files(
            source,
            output,
            bundle,
            task,
            concurrency=concurrency,
            threads=threads,
            model_batch_size=model_batch_size,
        )
    except Exception as e:
        if isinstance(e, ValueError) and type(e).__module__ == "builtins":
            raise
        message = _user_error(e)
        if message is None:
            raise
        raise ValueError(message) from None
