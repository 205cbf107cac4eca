"""``ptedge export``: trained runs -> one fused ONNX graph -> a checked bundle.

The steps, each in its own module of ``ptedge.export``: load the runs on one backbone
(``runs``), fuse their prompt tables into the embedding (``ptedge.fuse``) and check the
fused PyTorch graph (``parity``), export ONNX (``task_graph``, or ``decoder`` for
``--head generate``), check onnxruntime against PyTorch on real records (``parity``),
then optionally int8 or int4 under an accuracy guard (``quantize``) or fp16 for GPUs (``half``,
checked again), calibrate the shipped model's scores and fit a rejection threshold
(``calibrate``), swap in heads that were also fitted on the dev records those steps judged
on (``final_heads``), ORT format for mobile (``mobile``), and write the bundle atomically
(``bundle``). Llama-style causal LMs take another road to the same files: their graphs
come from onnxruntime-genai's builder (``causal``), quantized by it under the same guard,
and a generation run can also be written as a folder onnxruntime-genai loads (``genai``).

Not responsible for: how any one step is done; training; the runtime.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ptedge.checks import check_export_data
from ptedge.decoding import empty_past
from ptedge.defaults import REJECT_MAX_DROP
from ptedge.export import causal, final_heads
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
INT8_MODEL = "model.int8.onnx"
INT4_MODEL = "model.int4.onnx"
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
    format: str = "onnx"  # onnx | ort (+ model.ort, for mobile) | genai (onnxruntime-genai)
    dtype: str = "fp32"  # fp32 | fp16 (for GPUs; exclusive with quantize)
    reject: str | None = None  # records of no label: fit a rejection threshold
    reject_max_drop: float = REJECT_MAX_DROP  # in-scope dev accuracy points rejection may cost
    graph: str = "auto"  # auto (builder where it applies) | trace (TorchScript/optimum only)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_args(args: ExportArgs) -> None:
    check_out(Path(args.out), args.force)
    if args.format not in ("onnx", "ort", "genai"):
        raise ValueError(f"--format {args.format!r}: choose onnx, ort or genai")
    if args.quantize not in (None, *PRECISIONS):
        raise ValueError(f"--quantize {args.quantize!r}: choose one of {', '.join(PRECISIONS)}")
    if args.dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose fp32 or fp16")
    if args.graph not in ("auto", "trace"):
        raise ValueError(f"--graph {args.graph!r}: choose auto or trace")
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
    built = args.graph == "auto" and causal.uses_builder(runs, args.dtype)
    _check_builder_args(args, runs, built, generative)
    graph = None if generative or built else fuse([r.task for r in runs])
    if graph is not None:
        check_fused(graph, runs, samples)
    with atomic_folder(Path(args.out)) as tmp:
        if built:
            return _write_built(tmp, runs, samples, args)
        return _write_bundle(tmp, graph, runs, samples, args)


def _check_builder_args(args: ExportArgs, runs, built: bool, generative: bool) -> None:
    """The genai folder needs a builder graph of a generation run."""
    if args.format == "genai" and not (built and generative):
        raise ValueError(
            "--format genai needs a --head generate run on a backbone onnxruntime-genai's "
            f"builder takes ({', '.join(causal.builder.SUPPORTED_TYPES)}), in fp32/int8/int4"
        )


def _write_built(tmp: Path, runs, samples, args: ExportArgs) -> dict:
    """The bundle of a causal LM whose graphs come from onnxruntime-genai's builder."""
    import onnxruntime as ort

    def session(path: Path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    fp32 = tmp / FP32_MODEL
    generative = runs[0].cfg.head == "generate"
    if generative:
        _log("building the KV-cache decoder (onnxruntime-genai's builder, prompt rows grafted) ...")
        config = causal.build_decoder(runs[0], fp32)
        nodes = config["nodes"]
        s = session(fp32)
        parity = {runs[0].name: check_generation_parity(s, runs[0], samples[0])}
        outputs = {runs[0].name: "logits"}
    else:
        _log(
            "building the task graph (onnxruntime-genai's builder; prompt rows, heads grafted) ..."
        )
        config, nodes = None, causal.build_task_graph(runs, fp32)
        s = session(fp32)
        parity = check_parity(s, runs, samples)
        outputs = {r.name: output_name(r.name) for r in runs}
    _log(f"graph: {nodes} nodes; parity {parity}")
    inputs = [i.name for i in s.get_inputs()]
    del s
    model_file, quant = (
        FP32_MODEL,
        {"recipe": "fp32", "method": causal.METHODS["fp32"], "graph_nodes": nodes},
    )
    if args.quantize:
        name = INT8_MODEL if args.quantize == "int8" else INT4_MODEL
        _log(f"quantizing to {args.quantize} (builder recipes in order until the guard passes) ...")
        quant = causal.quantize_guarded(fp32, tmp / name, runs, args)
        _remove_model(fp32)
        model_file = name
    extra = {}
    if args.format == "genai":
        from ptedge.export import builder, genai

        prompt = genai.write_folder(tmp, runs[0], model_file, config)
        s = session(tmp / model_file)
        _log("checking the folder with onnxruntime-genai (prompt ids and greedy tokens) ...")
        extra["genai"] = {
            "prompt": prompt,
            "config": genai.GENAI_CONFIG,
            "check": genai.check_genai(builder.ensure_env(), tmp, s, runs[0], samples[0], prompt),
        }
        del s
        _log(f"genai: {extra['genai']}")
    _log("calibrating scores on dev records (temperature scaling) ...")
    task_extra = calibrate(
        session(tmp / model_file), runs, args.eval_file, args.reject, args.reject_max_drop
    )
    _swap_final_heads(tmp / model_file, runs, samples, task_extra)
    ort_entry = None
    if args.format == "ort":
        from ptedge.export.mobile import convert_to_ort

        _log("converting to ORT format (onnxruntime mobile) ...")
        feeds = graph_inputs(runs[0], samples[0][:4])
        if generative:
            s = session(tmp / model_file)
            feeds = {k: feeds[k] for k in ("input_ids", "attention_mask")} | empty_past(s, 4)
            del s
        ort_entry = convert_to_ort(tmp, model_file, feeds=feeds)
    return _finish(
        tmp, runs, args, model_file, inputs, outputs, parity, quant, ort_entry, task_extra, extra
    )


def _remove_model(path: Path) -> None:
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)


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
    _swap_final_heads(tmp / model_file, runs, samples, extra)  # saves it apart again
    ort_entry = None
    if args.format == "ort":
        from ptedge.export.mobile import convert_to_ort

        _log("converting to ORT format (onnxruntime mobile) ...")
        feeds = None if generative else graph_inputs(runs[0], samples[0])
        ort_entry = convert_to_ort(tmp, model_file, feeds=feeds)
    return _finish(tmp, runs, args, model_file, inputs, outputs, parity, quant, ort_entry, extra)


def _swap_final_heads(path: Path, runs, samples, task_extra: dict) -> None:
    """Ship the heads fitted with the carved dev records, now that every judgement on those
    records is made (``final_heads``); the manifest says so under ``head_fit``."""
    for name, report in final_heads.swap_in(path, runs, samples).items():
        task_extra.setdefault(name, {})["head_fit"] = report


def _finish(
    tmp: Path,
    runs,
    args,
    model_file,
    inputs,
    outputs,
    parity,
    quant,
    ort_entry,
    task_extra,
    extra=None,
) -> dict:
    """Write the manifest of a bundle folder (hashing every file) and report its size."""
    manifest = write_manifest(
        tmp,
        runs,
        model=model_file,
        io={"inputs": inputs, "outputs": outputs},
        parity=parity,
        dtype=args.dtype,
        quantization=quant,
        ort=ort_entry,
        task_extra=task_extra,
        **(extra or {}),
    )
    size = sum(p.stat().st_size for p in tmp.iterdir()) / 1e6
    _log(f"bundle: {model_file}, {size:.1f} MB")
    return manifest
