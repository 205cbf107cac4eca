"""``ptedge export``: trained runs -> one fused ONNX graph -> a checked bundle.

The steps, each in its own module of ``ptedge.export``: load the runs on one backbone
(``runs``), fuse their prompt tables into the embedding (``ptedge.fuse``) and check the
fused PyTorch graph (``parity``), export ONNX (``task_graph``, or ``decoder`` for
``--head generate``), check onnxruntime against PyTorch on real records (``parity``),
then optionally int8 or int4 under an accuracy guard (``quantize``) or fp16 for GPUs (``half``,
checked again), calibrate the shipped model's scores and fit a rejection threshold
(``calibrate``), ORT format for mobile (``mobile``), and write the bundle atomically
(``bundle``).

Not responsible for: how any one step is done; training; the runtime.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ptedge.checks import check_export_data
from ptedge.export.bundle import atomic_folder, check_out, store_weights_apart, write_manifest
from ptedge.export.calibrate import calibrate, check_inputs
from ptedge.export.decoder import export_decoder
from ptedge.export.half import convert_to_fp16, fp16_tolerance
from ptedge.export.parity import check_fused, check_generation_parity, check_parity
from ptedge.export.quantize import PRECISIONS, quantize_guarded
from ptedge.export.runs import load_runs, parity_records
from ptedge.export.scoring import graph_inputs, output_name
from ptedge.export.task_graph import export_onnx
from ptedge.fuse import fuse

FP32_MODEL = "model.onnx"
FP16_MODEL = "model.fp16.onnx"


@dataclass
class ExportArgs:
    runs: list[str]
    out: str
    quantize: str | None = None  # None | "int8" | "int4"
    eval_file: str | None = None
    eval_max: int = 1000  # records scored for the quantization guard
    max_drop: float = 1.0  # accuracy points int8/int4 may lose
    force: bool = False  # replace a non-empty out
    allow_accuracy_drop: bool = False  # write int8/int4 even past max_drop
    format: str = "onnx"  # onnx | ort (also model.ort + operator config, for mobile)
    dtype: str = "fp32"  # fp32 | fp16 (for GPUs; exclusive with quantize)
    reject: str | None = None  # records of no label: fit a rejection threshold
    reject_max_drop: float = 1.0  # in-scope dev accuracy points rejection may cost


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_args(args: ExportArgs) -> None:
    check_out(Path(args.out), args.force)
    if args.format not in ("onnx", "ort"):
        raise ValueError(f"--format {args.format!r}: choose onnx or ort")
    if args.quantize not in (None, *PRECISIONS):
        raise ValueError(f"--quantize {args.quantize!r}: choose one of {', '.join(PRECISIONS)}")
    if args.dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose fp32 or fp16")
    if args.dtype == "fp16" and args.quantize:
        raise ValueError(
            f"--dtype fp16 and --quantize {args.quantize} exclude each other; choose one"
        )


def export(args: ExportArgs) -> dict:
    """Run ``ptedge export``; returns the manifest written to ``args.out``."""
    _check_args(args)
    check_export_data(
        args.runs, args.eval_file, quantize=args.quantize is not None, reject_file=args.reject
    )
    runs, _ = load_runs(args.runs)
    check_inputs(runs, args.eval_file, args.reject)
    samples = [parity_records(r, args.eval_file) for r in runs]
    _log(
        f"fusing {len(runs)} task(s): "
        + ", ".join(f"{r.name} ({r.cfg.n_pseudo} prompt tokens)" for r in runs)
    )
    generative = runs[0].cfg.head == "generate"
    graph = None if generative else fuse([r.task for r in runs])
    if graph is not None:
        check_fused(graph, runs, samples)
    with atomic_folder(Path(args.out)) as tmp:
        return _write_bundle(tmp, graph, runs, samples, args)


def _write_bundle(tmp: Path, graph, runs, samples, args: ExportArgs) -> dict:
    import onnxruntime as ort

    def session(path: Path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    fp32 = tmp / FP32_MODEL
    generative = graph is None
    if generative:
        _log("exporting the KV-cache decoder (optimum, text-generation-with-past) ...")
        export_decoder(runs[0].task.model, fp32)
        s = session(fp32)
        parity = {runs[0].name: check_generation_parity(s, runs[0], samples[0])}
        _log(f"parity {runs[0].name}: {parity[runs[0].name]}")
        outputs = {runs[0].name: "logits"}
    else:
        _log("exporting ONNX (torch.onnx.export, TorchScript) ...")
        export_onnx(graph, runs, samples[0], fp32)
        del graph
        s = session(fp32)
        parity = check_parity(s, runs, samples)
        outputs = {r.name: output_name(r.name) for r in runs}
    inputs = [i.name for i in s.get_inputs()]
    del s
    model_file, quant = FP32_MODEL, None
    if args.quantize:
        _log(f"quantizing to {args.quantize} (recipes tried in order until the guard passes) ...")
        model_file = f"model.{args.quantize}.onnx"
        quant = quantize_guarded(fp32, tmp / model_file, runs, args)
        fp32.unlink()
    elif args.dtype == "fp16":
        _log("converting to fp16 (onnxruntime float16 converter), checking it again ...")
        convert_to_fp16(fp32, tmp / FP16_MODEL)
        fp32.unlink()
        model_file = FP16_MODEL
        s = session(tmp / FP16_MODEL)
        if generative:
            parity = {runs[0].name: check_generation_parity(s, runs[0], samples[0], True)}
            _log(f"parity {runs[0].name} (fp16): {parity[runs[0].name]}")
        else:
            parity = check_parity(s, runs, samples, fp16_tolerance)
        del s
    _log("calibrating scores on dev records (temperature scaling) ...")
    extra = calibrate(
        session(tmp / model_file), runs, args.eval_file, args.reject, args.reject_max_drop
    )
    store_weights_apart(tmp / model_file)
    ort_entry = None
    if args.format == "ort":
        from ptedge.export.mobile import convert_to_ort

        _log("converting to ORT format (onnxruntime mobile) ...")
        feeds = None if generative else graph_inputs(runs[0], samples[0])
        ort_entry = convert_to_ort(tmp, model_file, feeds=feeds)
    manifest = write_manifest(
        tmp,
        runs,
        model=model_file,
        io={"inputs": inputs, "outputs": outputs},
        parity=parity,
        dtype=args.dtype,
        quantization=quant,
        ort=ort_entry,
        task_extra=extra,
    )
    size = sum(p.stat().st_size for p in tmp.iterdir()) / 1e6
    _log(f"bundle: {model_file}, {size:.1f} MB")
    return manifest
