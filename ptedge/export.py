"""Export: trained runs -> one fused ONNX task graph -> a bundle onnxruntime can run.

Steps: load the runs (one shared backbone), fuse their prompt tables into the
embedding (``ptedge.fuse``), check the fused PyTorch graph against the unfused
training-time models, export with ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``: our task graph has custom inputs and outputs that optimum's
task-based exporters do not describe, and the TorchScript path gave dynamic batch and
length on both BERT and Llama), check onnxruntime against PyTorch on real records
(``ParityError`` above ``PARITY_ATOL``), optionally quantize to int8 under an accuracy
guard (``ptedge.quantize``) or convert to fp16 for GPUs (``ptedge.half``, checked
again), and write the bundle atomically (temporary folder, rename).

Not responsible for: training, the runtime (``ptedge.runtime``), quantization details.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ptedge
from ptedge.config import BUNDLE_FORMAT_VERSION, BUNDLE_MANIFEST, RunConfig, write_json_atomic
from ptedge.data import read_records
from ptedge.fuse import FusedTask, TaskGraph, fuse
from ptedge.model import build_for_run, load_backbone
from ptedge.template import encode, record_fields, with_pseudo_base

PARITY_ATOL = 2e-3  # largest |onnxruntime - PyTorch| score allowed, fp32
FUSE_ATOL = 1e-4  # largest |fused - unfused| score allowed, both in PyTorch
PARITY_RECORDS = 32  # real records compared at export
OPSET = 17
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
FP16_MODEL = "model.fp16.onnx"


class ParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond tolerance."""


@dataclass
class ExportArgs:
    runs: list[str]
    out: str
    quantize: str | None = None  # None | "int8"
    eval_file: str | None = None
    eval_max: int = 1000  # records scored for the int8 guard
    max_drop: float = 1.0  # accuracy points int8 may lose
    force: bool = False
    format: str = "onnx"  # onnx | ort (also model.ort + operator config, for mobile)
    dtype: str = "fp32"  # fp32 | fp16 (for GPUs; exclusive with quantize)


@dataclass
class LoadedRun:
    name: str
    cfg: RunConfig
    task: FusedTask
    tok: object
    compiled: dict  # compiled template with the bundle's pseudo base


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_runs(run_dirs: list[str]) -> tuple[list[LoadedRun], torch.nn.Module]:
    """Load runs sharing one backbone; pseudo ids are laid out one task after another."""
    cfgs = [RunConfig.load(d) for d in run_dirs]
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"task names (run folder names) must be unique: {names}")
    for d, c in zip(run_dirs[1:], cfgs[1:], strict=True):
        if c.model_sha256 != cfgs[0].model_sha256:
            raise ValueError(f"{d}: trained on another backbone than {run_dirs[0]}")
        if c.head == "generate":
            raise ValueError(f"{d}: generation runs cannot share a bundle with other tasks")
    backbone = load_backbone(cfgs[0].model)
    loaded, offset = [], 0
    for d, name, cfg in zip(run_dirs, names, cfgs, strict=True):
        model, tok, compiled, _ = build_for_run(cfg, backbone)
        model.load_weights(d)
        model.eval()
        compiled = with_pseudo_base(compiled, cfg.vocab_size + offset)
        loaded.append(LoadedRun(name, cfg, FusedTask(name, model, offset), tok, compiled))
        offset += cfg.n_pseudo
    return loaded, backbone


def parity_records(run: LoadedRun, eval_file: str | None, n: int = PARITY_RECORDS) -> list[dict]:
    """Up to n real records of the run's data with the template's fields."""
    path = eval_file or run.cfg.dev_file or run.cfg.train_file
    if not path:
        raise ValueError(f"run {run.name} has no data file for the parity check; use --eval FILE")
    recs = read_records(path)
    need = record_fields(run.compiled)
    usable = [r for r in recs if all(r.get(f) is not None for f in need)]
    return random.Random(0).sample(usable, min(n, len(usable)))


def _unfused_scores(run: LoadedRun, records: list[dict]) -> np.ndarray:
    """Scores of the training-time model (pseudo ids from V, as in training)."""
    compiled = with_pseudo_base(run.compiled, run.cfg.vocab_size)
    enc = encode(compiled, run.tok, records)
    with torch.inference_mode():
        out = run.task.model(
            torch.from_numpy(enc.input_ids),
            torch.from_numpy(enc.attention_mask),
            torch.from_numpy(enc.slot),
        )
    return out.float().numpy()


def _graph_inputs(run: LoadedRun, records: list[dict]) -> dict[str, np.ndarray]:
    enc = encode(run.compiled, run.tok, records)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "slot": enc.slot}


def check_fused(graph: TaskGraph, runs: list[LoadedRun], samples: list[list[dict]]) -> None:
    """The fused PyTorch graph must reproduce each unfused model before export."""
    for i, (run, recs) in enumerate(zip(runs, samples, strict=True)):
        inputs = {k: torch.from_numpy(v) for k, v in _graph_inputs(run, recs).items()}
        with torch.inference_mode():
            fused = graph(**inputs)[i].float().numpy()
        diff = float(np.abs(fused - _unfused_scores(run, recs)).max())
        if diff > FUSE_ATOL:
            raise ParityError(f"task {run.name}: fused graph differs from training model by {diff}")


@contextmanager
def traceable_masks():
    """Swap in optimum's TorchScript-safe attention-mask builders while tracing.

    transformers >= 4.53 builds masks with vmap, which TorchScript cannot trace;
    optimum's ONNX model patcher ships vmap-free replacements, reused here.
    """
    from optimum.exporters.onnx import model_patcher as mp
    from transformers import masking_utils as mu

    masks = mu.ALL_MASK_ATTENTION_FUNCTIONS
    packed = mu.find_packed_sequence_indices
    masks.register("sdpa", mp.sdpa_mask_without_vmap)
    masks.register("eager", mp.eager_mask_without_vmap)
    mu.find_packed_sequence_indices = mp.find_packed_sequence_indices_patched
    try:
        yield
    finally:
        masks.register("sdpa", mu.sdpa_mask)
        masks.register("eager", mu.eager_mask)
        mu.find_packed_sequence_indices = packed


def trace_example(run: LoadedRun, records: list[dict]) -> tuple[torch.Tensor, ...]:
    """Two encoded records plus one padding column, so tracing takes the padded-mask path
    (an all-ones mask lets transformers skip building the mask, and tracing would keep that)."""
    inputs = _graph_inputs(run, records[:2])
    ids = np.pad(inputs["input_ids"], ((0, 0), (0, 1)), constant_values=run.compiled["pad_id"])
    mask = np.pad(inputs["attention_mask"], ((0, 0), (0, 1)))
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(inputs["slot"])


def export_onnx(graph: TaskGraph, runs: list[LoadedRun], sample: list[dict], path: Path) -> None:
    """torch.onnx.export (TorchScript) with dynamic batch and length."""
    args = trace_example(runs[0], sample)
    outputs = [output_name(r.name) for r in runs]
    dyn = {
        "input_ids": {0: "batch", 1: "length"},
        "attention_mask": {0: "batch", 1: "length"},
        "slot": {0: "batch"},
    }
    dyn.update({o: {0: "batch"} for o in outputs})
    # the TorchScript tracer warns about every data-dependent Python branch in
    # transformers; parity checks below are what tells whether the graph is right
    with torch.inference_mode(), traceable_masks(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=["input_ids", "attention_mask", "slot"],
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
        )


def output_name(task: str) -> str:
    return f"scores.{task}"


def onnx_scores(session, run: LoadedRun, records: list[dict]) -> np.ndarray:
    feeds = _graph_inputs(run, records)
    names = {i.name for i in session.get_inputs()}  # a head that ignores the slot drops it
    out = session.run([output_name(run.name)], {k: v for k, v in feeds.items() if k in names})[0]
    return out.astype(np.float32)


def check_parity(
    session,
    runs: list[LoadedRun],
    samples: list[list[dict]],
    tolerance: Callable[[np.ndarray], float] = lambda ref: PARITY_ATOL,
) -> dict:
    """Per task: largest |onnxruntime - PyTorch| score and label agreement; raises above
    ``tolerance(reference scores)`` (fp32: ``PARITY_ATOL``; fp16: ``ptedge.half``)."""
    report = {}
    for run, recs in zip(runs, samples, strict=True):
        ref = _unfused_scores(run, recs)
        got = onnx_scores(session, run, recs)
        diff = float(np.abs(ref - got).max())
        tol = tolerance(ref)
        agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
        report[run.name] = {"max_abs_diff": diff, "labels_equal": agree, "n": len(recs)}
        _log(
            f"parity {run.name}: output {output_name(run.name)} max |diff| {diff:.2e} "
            f"(tolerance {tol:.1e}), labels equal {agree:.3f} on {len(recs)} records"
        )
        if diff > tol:
            raise ParityError(
                f"task {run.name}: output {output_name(run.name)} differs from PyTorch by "
                f"{diff:.3e} (tolerance {tol:.3e})"
            )
    return report


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def store_weights_apart(path: Path) -> None:
    """Rewrite an ONNX file with its weights in ``<name>.data`` beside it (ONNX external data).

    onnxruntime then reads the weights from that file instead of parsing them into a
    protobuf first and copying them out: a client's peak memory while loading drops by
    about the model's size (MiniLM int8: session peak 94 -> 69 MB; a whole Predictor
    process 109 -> 89 MB).
    """
    import onnx

    model = onnx.load(str(path))
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def task_entry(run: LoadedRun) -> dict:
    """The manifest's description of one task (everything a client needs)."""
    cfg = run.cfg
    m = run.task.model
    kind = "generate" if cfg.head == "generate" else "classify" if cfg.labels else "vocab"
    return {
        "kind": kind,
        "head": cfg.head,
        "template": run.compiled,
        "label_field": cfg.label_field,
        "labels": cfg.labels,
        "label_ids": m.label_ids.tolist() if m.label_ids.numel() else None,
        "verbalizer": cfg.verbalizer,
        "pseudo_ids": [cfg.vocab_size + run.task.offset, cfg.n_pseudo],
        "output": "logits" if kind == "generate" else output_name(run.name),
        "eos_id": cfg.eos_id,
        "train_metrics": cfg.best,
    }


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out}: output folder is not empty (use --force to replace it)")


def export(args: ExportArgs) -> dict:
    """Run ``ptedge export``; returns the manifest written to ``args.out``."""
    out = Path(args.out)
    _prepare_out(out, args.force)
    if args.format not in ("onnx", "ort"):
        raise ValueError(f"--format {args.format!r}: choose onnx or ort")
    if args.quantize not in (None, "int8"):
        raise ValueError(f"--quantize {args.quantize!r}: only int8 is supported")
    if args.dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose fp32 or fp16")
    if args.dtype == "fp16" and args.quantize:
        raise ValueError("--dtype fp16 and --quantize int8 exclude each other; choose one")
    runs, _ = load_runs(args.runs)
    samples = [parity_records(r, args.eval_file) for r in runs]
    _log(
        f"fusing {len(runs)} task(s): "
        + ", ".join(f"{r.name} ({r.cfg.n_pseudo} prompt tokens)" for r in runs)
    )
    generative = runs[0].cfg.head == "generate"
    graph = None if generative else fuse([r.task for r in runs])
    if graph is not None:
        check_fused(graph, runs, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write_bundle(tmp, graph, runs, samples, args)
        tmp.chmod(0o755)  # mkdtemp makes it private; bundles are meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_bundle(tmp: Path, graph, runs, samples, args: ExportArgs) -> dict:
    import onnxruntime as ort

    from ptedge.export_decoder import check_generation_parity, export_decoder
    from ptedge.half import convert_to_fp16, fp16_tolerance
    from ptedge.quantize import quantize_guarded

    fp32 = tmp / FP32_MODEL
    generative = graph is None
    if generative:
        _log("exporting the KV-cache decoder (optimum, text-generation-with-past) ...")
        export_decoder(runs[0].task.model, fp32)
        session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        parity = {runs[0].name: check_generation_parity(session, runs[0], samples[0])}
        _log(f"parity {runs[0].name}: {parity[runs[0].name]}")
        inputs = [i.name for i in session.get_inputs()]
        outputs = {runs[0].name: "logits"}
    else:
        _log("exporting ONNX (torch.onnx.export, TorchScript) ...")
        export_onnx(graph, runs, samples[0], fp32)
        del graph
        session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        parity = check_parity(session, runs, samples)
        inputs = [i.name for i in session.get_inputs()]
        outputs = {r.name: output_name(r.name) for r in runs}
    del session
    model_file = FP32_MODEL
    quant = None
    if args.quantize == "int8":
        int8 = tmp / INT8_MODEL
        _log("quantizing to int8 (recipes tried in order until the guard passes) ...")
        quant = quantize_guarded(fp32, int8, runs, args)
        fp32.unlink()
        model_file = INT8_MODEL
    elif args.dtype == "fp16":
        fp16 = tmp / FP16_MODEL
        _log("converting to fp16 (onnxruntime float16 converter), checking it again ...")
        convert_to_fp16(fp32, fp16)
        fp32.unlink()
        model_file = FP16_MODEL
        session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
        if generative:
            parity = {runs[0].name: check_generation_parity(session, runs[0], samples[0], True)}
            _log(f"parity {runs[0].name} (fp16): {parity[runs[0].name]}")
        else:
            parity = check_parity(session, runs, samples, fp16_tolerance)
        del session
    store_weights_apart(tmp / model_file)
    ort_entry = None
    if args.format == "ort":
        from ptedge.mobile import convert_to_ort

        _log("converting to ORT format (onnxruntime mobile) ...")
        feeds = None if generative else _graph_inputs(runs[0], samples[0])
        ort_entry = convert_to_ort(tmp, model_file, feeds=feeds)
    cfg0 = runs[0].cfg
    shutil.copy(Path(cfg0.model) / "tokenizer.json", tmp / "tokenizer.json")
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "ptedge_version": ptedge.__version__,
        "backbone": {
            "name": Path(cfg0.model).name,
            "sha256": cfg0.model_sha256,
            "vocab_size": cfg0.vocab_size,
            "hidden_size": cfg0.hidden_size,
            "causal": cfg0.causal,
        },
        "model": model_file,
        "tokenizer": "tokenizer.json",
        "io": {"inputs": inputs, "outputs": outputs},
        "tasks": {r.name: task_entry(r) for r in runs},
        "parity": parity,
        "dtype": args.dtype,
        "quantization": quant,
        "ort": ort_entry,
    }
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    write_json_atomic(tmp / BUNDLE_MANIFEST, manifest)
    size = sum(p.stat().st_size for p in tmp.iterdir()) / 1e6
    _log(f"bundle: {model_file}, {size:.1f} MB")
    return manifest
