"""int8 for exported task graphs, and the accuracy guard that decides if it ships.

Two measured choices (see DESIGN.md, "Known traps"):
- weights of the backbone's MatMuls: onnxruntime dynamic quantization, per-channel
  int8, constant weights only; the task heads (LM head, label heads, linear heads)
  stay float, since per-tensor int8 of SmolLM2's LM head changed its top-1 answers.
  BERT-family encoders are fused first (``ptedge.export.fusion``) and their fused attention
  is quantized too;
- the word embedding, prompt rows included: *per-row* int8 with one scale per row
  (a Gather of int8 rows and of their scales, then a Mul). onnxruntime's own Gather
  quantization uses one scale for the whole table and would crush the prompt rows,
  which have their own scale; leaving the table in float would keep most of a small
  backbone's bytes (MiniLM: 47 of 90 MB).

The guard (``quantize_guarded``) tries three recipes in order until every task stays
within ``--max-drop`` on its data: ``all`` (above; smallest and fastest),
``weight-only`` (onnxruntime's MatMulNBits at 8 bits, blocks of 32: activations are
quantized per block, not per tensor, and the embedding stays float) and
``weight-only-float`` (the same weights, arithmetic in float: the same size, closest to
fp32; a SmolLM2 P37 prompt lost 3 of 92 dev facts with ``weight-only``). Measured here:
MiniLM/BANKING77 keeps accuracy with ``all`` (0.769 vs 0.775, 26% of fp32's size);
SmolLM2 lost ~10 points on LAMA dev sets and 8.6 on SST-2 dev with ``all`` (Llama's
activation outliers against per-tensor scales), while ``weight-only`` gave P37 test
P@1 0.767 = fp32, at batch 1 and 32 alike.

We call onnxruntime.quantization directly rather than optimum's ORTQuantizer: it is
the same engine, and the node exclusion and per-row embedding need graph access.

Not responsible for: exporting, deciding tolerances of fp32 parity.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

from ptedge.data import Records, labels_of, read_records
from ptedge.export.fusion import encoder_shape, fuse_encoder
from ptedge.export.scoring import onnx_generate, onnx_scores
from ptedge.targets import class_targets, exact_match, vocab_targets

# node-name prefixes of heads left in float: task heads of task graphs, the LM head of decoders
HEAD_PREFIXES = ("/heads", "/lm_head")


RECIPES = {
    "all": "dynamic int8: per-channel int8 MatMul weights (fused Attention too, for BERT-family "
    "encoders), int8 activations per tensor, per-row int8 embedding",
    "weight-only": "weight-only int8: MatMulNBits, 8-bit weights in blocks of 32 with their "
    "own scales, activations int8 per block (accuracy level 4), embedding in float",
    "weight-only-float": "weight-only int8: MatMulNBits, 8-bit weights in blocks of 32 with "
    "their own scales, activations and arithmetic in float (accuracy level 1), embedding in "
    "float",
}
# MatMulNBits accuracy level (its arithmetic) of each weight-only recipe
NBITS_LEVEL = {"weight-only": 4, "weight-only-float": 1}
NBITS_BLOCK = 32


def excluded_nodes(model) -> list[str]:
    """MatMul/Gemm nodes left in float: the task heads and the LM head."""
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.name.startswith(HEAD_PREFIXES)
    ]


def quantize_int8(fp32: Path, int8: Path, recipe: str = "all", encoder: dict | None = None) -> dict:
    """Write an int8 copy of ``fp32`` to ``int8``; returns what was done, for the manifest.

    ``encoder`` (``ptedge.export.fusion.encoder_shape`` of a BERT-family backbone) makes the
    ``all`` recipe fuse attention, layer norms and GELU first and quantize the fused
    ``Attention`` too.
    """
    import onnx

    model = onnx.load(str(fp32))
    excluded = excluded_nodes(model)
    table, fused = None, None
    if recipe == "all":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        del model
        src = int8.with_name(int8.name + ".fused.tmp")
        try:
            if encoder:
                fused = fuse_encoder(fp32, src, encoder)
            quantize_dynamic(
                str(src if fused else fp32),
                str(int8),
                op_types_to_quantize=["MatMul", "Attention"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                # fused ops are com.microsoft ones, which shape inference cannot type
                extra_options={
                    "MatMulConstBOnly": True,
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                },
            )
        finally:
            src.unlink(missing_ok=True)
        model = onnx.load(str(int8))
        table = quantize_embedding_rows(model)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        level = NBITS_LEVEL[recipe]
        config = DefaultWeightOnlyQuantConfig(
            block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=level, bits=8
        )
        q = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=NBITS_BLOCK,
            is_symmetric=True,
            accuracy_level=level,
            nodes_to_exclude=excluded,
            algo_config=config,
        )
        q.process()
        model = q.model.model
    onnx.save(model, str(int8))
    return {
        "recipe": recipe,
        "method": RECIPES[recipe],
        "fused_ops": fused,
        "excluded_nodes": excluded,
        "embedding": table,
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
    }


def quantize_embedding_rows(model) -> str | None:
    """Replace the word-embedding Gather with per-row int8 rows and scales, in place.

    The word embedding is the largest 2-D initializer read by a Gather as its data and
    by nothing else. Returns its name (or None if there is none).
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    best = None
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(consumers[n.input[0]]) == 1:
            dims = inits[n.input[0]].dims
            if len(dims) == 2 and (best is None or dims[0] * dims[1] > best[1]):
                best = (n, dims[0] * dims[1])
    if best is None:
        return None
    node = best[0]
    name = node.input[0]
    w = numpy_helper.to_array(inits[name]).astype(np.float32)  # (R, H)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127.0  # (R, 1)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)  # (R, H)
    g.initializer.remove(inits[name])
    g.initializer.extend(
        [
            numpy_helper.from_array(q, f"{name}.int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"),
        ]
    )
    ids, out = node.input[1], node.output[0]
    pos = list(g.node).index(node)
    g.node.remove(node)
    new = [
        helper.make_node("Gather", [f"{name}.int8", ids], [f"{out}.q"], name=f"{node.name}.q"),
        helper.make_node(
            "Cast", [f"{out}.q"], [f"{out}.f"], to=TensorProto.FLOAT, name=f"{node.name}.cast"
        ),
        helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.s"], name=f"{node.name}.s"),
        helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{node.name}.mul"),
    ]
    for k, n in enumerate(new):
        g.node.insert(pos + k, n)
    return name


def _task_accuracy(session, run, records, targets) -> float:
    if run.cfg.head == "generate":
        texts = [run.tok.decode(t) for t in onnx_generate(session, run, records, 32)]
        return exact_match(texts, targets)["accuracy"]

    keep = [i for i, t in enumerate(targets) if t is not None]
    correct = 0
    for i in range(0, len(keep), 32):
        idx = keep[i : i + 32]
        pred = onnx_scores(session, run, [records[j] for j in idx]).argmax(-1)
        correct += sum(int(p) == targets[j] for p, j in zip(pred, idx, strict=True))
    return correct / max(1, len(keep))


def _guard_data(run, args):
    """(path, records, targets) the guard scores a task on."""
    path = args.eval_file or run.cfg.dev_file or run.cfg.train_file
    recs = read_records(path)
    if len(recs) > args.eval_max:
        idx = sorted(random.Random(0).sample(range(len(recs)), args.eval_max))
        recs = Records(recs.path, [recs[i] for i in idx], [recs.lines[i] for i in idx])
    if run.cfg.head == "generate":
        targets = labels_of(recs, run.cfg.label_field)
    elif run.cfg.labels is None:
        targets = vocab_targets(recs, run.cfg.label_field, run.compiled, run.tok)
    else:
        targets = class_targets(recs, run.cfg.label_field, run.cfg.labels)
    return path, recs, targets


def quantize_guarded(fp32: Path, int8: Path, runs, args) -> dict:
    """int8 that keeps every task within ``max_drop`` accuracy points of fp32.

    Tries the recipes in order (``all``, ``weight-only``, ``weight-only-float``), measuring
    each task on its guard data; the first recipe within the limit is kept. If none is,
    the export is refused, or with ``force`` the recipe that lost least is written.
    """
    import onnxruntime as ort

    def session(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])

    encoder = None if runs[0].cfg.causal else encoder_shape(runs[0].cfg.model)
    data = {run.name: _guard_data(run, args) for run in runs}
    ref = session(fp32)
    base = {r.name: _task_accuracy(ref, r, *data[r.name][1:]) for r in runs}
    tried = []
    for recipe in RECIPES:
        info = quantize_int8(fp32, int8, recipe, encoder)
        s8 = session(int8)
        guard = {}
        for run in runs:
            path, recs, targets = data[run.name]
            acc8 = _task_accuracy(s8, run, recs, targets)
            guard[run.name] = {
                "data": str(path),
                "n": sum(t is not None for t in targets),
                "fp32_accuracy": base[run.name],
                "int8_accuracy": acc8,
            }
            print(
                f"int8 guard ({recipe}) {run.name}: fp32 {base[run.name]:.4f}, int8 "
                f"{acc8:.4f} ({100 * (base[run.name] - acc8):+.2f} points lost) on {path}",
                file=sys.stderr,
            )
        del s8
        worst = max(100 * (g["fp32_accuracy"] - g["int8_accuracy"]) for g in guard.values())
        info["guard"] = guard
        info["max_drop_points"] = worst
        if worst <= args.max_drop:
            return info
        tried.append((worst, recipe, info))
    worst, recipe, info = min(tried, key=lambda t: t[0])
    if not args.force:
        raise ValueError(
            f"int8 loses up to {worst:.2f} accuracy points even with recipe {recipe!r} "
            f"(limit --max-drop {args.max_drop}); use --force to write it anyway"
        )
    print(
        f"warning: writing int8 past --max-drop (--force): {worst:.2f} points lost", file=sys.stderr
    )
    if recipe != list(RECIPES)[-1]:
        info = quantize_int8(fp32, int8, recipe, encoder) | {
            "guard": info["guard"],
            "max_drop_points": worst,
        }
    return info
