"""Quantized bundles (``--quantize int8|int4``): the recipes, and the accuracy guard that
decides which one ships.

``RECIPES`` is the one table of recipes: each is a small function from the fp32 graph to
a quantized one, with its name, precision and description; the guard (``ptedge.export.guard``)
tries the recipes of the asked precision that suit the backbone, in table order, until
every task stays within ``--max-drop`` accuracy points of fp32 on its guard data (a loss
the guard records cannot tell from chance aside). A new recipe is a function and a row.

Every recipe gives a record the same answer whatever else is in its batch: activation
scales are constants calibrated at export (``static``), computed per block of each
row (``MatMulNBits`` at accuracy level 4) or per token (``int8-token`` of
``ptedge.export.causal``), never per batch. A per-batch scale (the
earlier recipe, onnxruntime's dynamic quantization) made 14 of 400 BANKING77 test labels
change between batch sizes 1 and 32.

- ``static`` (int8; encoders and other non-causal graphs): BERT-family encoders fused
  first (``ptedge.export.fusion``), per-channel 7-bit int8 MatMul weights (within +-64:
  ``quant_graph.MATMUL_WEIGHT_PEAK``, recorded as ``weight_peak``) and fused attention
  (``QAttention``), activations int8 with one scale per tensor calibrated on the guard
  data's records (min/max over real tokens), a MatMul input's outlier channels kept out of
  its scale and multiplied in float (``ptedge.export.outlier_channels``, recorded as
  ``float_channels``), the word embedding per-row int8. Not tried when a task's guard
  records are too few for a loss of ``--max-drop`` to count (``guard.records_needed``:
  500 at 1 point), recorded as ``skipped``: ``static`` changes a few labels in a hundred,
  which such a guard cannot see, and the next recipe keeps fp32's labels.
- ``weight-only`` / ``weight-only-float`` (int8): ``MatMulNBits`` 8-bit weights in blocks
  of 32, activations int8 per block of each row (level 4), or float arithmetic (level 1);
  an encoder's word embedding per-row int8, a causal LM's in float. What keeps SmolLM2
  accurate (its activation outliers defeat per-tensor scales: ~10 points lost on LAMA,
  8.6 on SST-2 dev).
- ``int4`` / ``int4-float``: ``MatMulNBits`` 4-bit weights in blocks of 32 (level 4, then
  level 1), the word embedding 4-bit in blocks of 32 (``GatherBlockQuantized``).

Task heads (label heads, linear heads, the LM head) stay float in every recipe: per-tensor
int8 of SmolLM2's LM head changed its top-1 answers.

Not responsible for: exporting, the graph rewrites themselves
(``ptedge.export.quant_graph``), judging accuracy (``ptedge.export.guard``), fp32 parity
tolerances.
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ptedge.export import outlier_channels as oc
from ptedge.export import quant_graph as qg
from ptedge.export.bundle import data_source
from ptedge.export.fusion import encoder_shape, fuse_encoder
from ptedge.export.guard import guard, guard_records, records_needed
from ptedge.export.scoring import graph_inputs
from ptedge.template import record_fields

CALIBRATION_RECORDS = 256  # records per task whose activations set the static int8 scales


@dataclass
class Context:
    """What a recipe may need besides the fp32 graph."""

    excluded: list[str]  # MatMul/Gemm nodes left in float (heads)
    encoder: dict | None = None  # ``fusion.encoder_shape`` of a BERT-family backbone
    calibration: list[dict] = field(default_factory=list)  # one record's feeds each
    calibration_data: dict = field(default_factory=dict)  # task -> {file, sha256, n}


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str  # what --quantize asks for: int8 | int4
    description: str  # stored in the manifest as "method"
    build: Callable[[Path, Path, Context], dict]  # (fp32, out, ctx) -> facts for the manifest
    causal: bool = True  # tried on causal LMs
    encoder: bool = True  # tried on encoders and other non-causal graphs


def _fused(fp32: Path, tmp: Path, ctx: Context, attention: bool) -> tuple[Path, dict | None]:
    """The graph a recipe starts from: ``fp32`` fused into ``tmp`` for an encoder."""
    if ctx.encoder is None:
        return fp32, None
    return tmp, fuse_encoder(fp32, tmp, ctx.encoder, attention=attention)


def _static_int8(fp32: Path, out: Path, ctx: Context) -> dict:
    import onnx

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, fused = _fused(fp32, Path(tmp) / "fused.onnx", ctx, attention=True)
        qg.quantize_dynamic_int8(src, out, ctx.excluded)
        model = onnx.load(str(out))
        names = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
        ranges = qg.channel_ranges(src, names, ctx.calibration)
        chosen = oc.plan(model, ranges)
        weights = oc.float_weights(onnx.load(str(src)), chosen) if chosen else {}
    qg.static_activations(
        model, {x: oc.tensor_range(lo, hi, chosen.get(x)) for x, (lo, hi) in ranges.items()}
    )
    floated = oc.add_float_path(model, chosen, weights)
    table = qg.quantize_embedding_rows(model)
    onnx.save(model, str(out))
    return {
        "fused_ops": fused,
        "embedding": table,
        "calibration": ctx.calibration_data,
        "weight_peak": qg.MATMUL_WEIGHT_PEAK,
        "float_channels": floated,
    }


def _nbits(fp32: Path, out: Path, ctx: Context, bits: int, level: int) -> dict:
    import onnx

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, fused = _fused(fp32, Path(tmp) / "fused.onnx", ctx, attention=False)
        model = qg.matmul_nbits(onnx.load(str(src)), bits, level, ctx.excluded)
    if bits == 4:
        table = qg.quantize_embedding_blocks(model, bits)
    else:  # an encoder's word embedding as ``static`` has it; a causal LM's stays float
        table = qg.quantize_embedding_rows(model) if ctx.encoder is not None else None
    onnx.save(model, str(out))
    return {"fused_ops": fused, "embedding": table}


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "static",
        "int8",
        "static int8: per-channel 7-bit int8 MatMul weights (fused attention too, for "
        "BERT-family encoders), int8 activations with one scale per tensor calibrated at "
        "export, MatMul inputs' outlier channels in float, per-row int8 embedding",
        _static_int8,
        causal=False,
    ),
    Recipe(
        "weight-only",
        "int8",
        "weight-only int8: MatMulNBits, 8-bit weights in blocks of 32 with their own scales, "
        "activations int8 per block of each row (accuracy level 4), embedding in float",
        partial(_nbits, bits=8, level=4),
    ),
    Recipe(
        "weight-only-float",
        "int8",
        "weight-only int8: MatMulNBits, 8-bit weights in blocks of 32 with their own scales, "
        "activations and arithmetic in float (accuracy level 1), embedding in float",
        partial(_nbits, bits=8, level=1),
    ),
    Recipe(
        "int4",
        "int4",
        "int4: MatMulNBits, 4-bit weights in blocks of 32 with their own scales, activations "
        "int8 per block of each row (accuracy level 4), embedding 4-bit in blocks of 32",
        partial(_nbits, bits=4, level=4),
    ),
    Recipe(
        "int4-float",
        "int4",
        "int4: MatMulNBits, 4-bit weights in blocks of 32 with their own scales, activations "
        "and arithmetic in float (accuracy level 1), embedding 4-bit in blocks of 32",
        partial(_nbits, bits=4, level=1),
    ),
)
PRECISIONS = tuple(dict.fromkeys(r.precision for r in RECIPES))


def recipe(name: str) -> Recipe:
    for r in RECIPES:
        if r.name == name:
            return r
    raise ValueError(f"no quantization recipe {name!r} (recipes: {[r.name for r in RECIPES]})")


def recipes_for(precision: str, causal: bool) -> list[Recipe]:
    """The recipes the guard tries, in order, for ``precision`` on this kind of backbone."""
    return [r for r in RECIPES if r.precision == precision and (r.causal if causal else r.encoder)]


def excluded_nodes(model) -> list[str]:
    """MatMul/Gemm nodes left in float: the task heads and the LM head.

    onnxruntime's dynamic quantization first rewrites a Gemm into a MatMul named
    ``<name>_MatMul`` (and an Add), so a Gemm head is excluded under both names.
    """
    names = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.name.startswith(qg.HEAD_PREFIXES):
            names += [n.name, f"{n.name}_MatMul"] if n.op_type == "Gemm" else [n.name]
    return names


def quantize(fp32: Path, out: Path, name: str, ctx: Context) -> dict:
    """Write ``fp32`` quantized by recipe ``name`` to ``out``; returns what was done, for
    the manifest."""
    r = recipe(name)
    facts = r.build(fp32, out, ctx)
    return {
        "recipe": r.name,
        "precision": r.precision,
        "method": r.description,
        "fused_ops": facts.get("fused_ops"),
        "excluded_nodes": ctx.excluded,
        "embedding": facts.get("embedding"),
        **{k: facts[k] for k in ("calibration", "weight_peak", "float_channels") if k in facts},
        "fp32_bytes": fp32.stat().st_size,
        "bytes": out.stat().st_size,
    }


def calibration_feeds(runs, data: dict) -> tuple[list[dict], dict]:
    """Feeds of ``CALIBRATION_RECORDS`` records per task, one record each (no padding),
    drawn (seeded) from each task's guard data ``data``; and task -> where they came from."""
    feeds: list[dict] = []
    sources = {}
    for run in runs:
        path, recs, _ = data[run.name]
        need = record_fields(run.compiled)
        usable = [r for r in recs if all(r.get(f) is not None for f in need)]
        picked = random.Random(1).sample(usable, min(CALIBRATION_RECORDS, len(usable)))
        feeds += [graph_inputs(run, [r]) for r in picked]
        sources[run.name] = {**data_source(path), "n": len(picked)}
    return feeds, sources


def _context(fp32: Path, runs, data: dict) -> Context:
    """Heads to leave float, the encoder's shape, and for task graphs calibration feeds
    from each task's guard data."""
    import onnx

    ctx = Context(excluded=excluded_nodes(onnx.load(str(fp32), load_external_data=False)))
    if not runs[0].cfg.causal:
        ctx.encoder = encoder_shape(runs[0].cfg.model)
    if runs[0].cfg.head == "generate":  # a KV-cache decoder takes other feeds
        return ctx
    ctx.calibration, ctx.calibration_data = calibration_feeds(runs, data)
    return ctx


def quantize_guarded(fp32: Path, out: Path, runs, args) -> dict:
    """A quantized graph that keeps every task within ``max_drop`` accuracy points of fp32
    (losses within chance aside): ``ptedge.export.guard.guard`` over
    ``recipes_for(args.quantize, ...)``, written by ``quantize``."""
    ctx: list[Context] = []  # made once, from the guard data, by the first recipe

    def write(name: str, data: dict) -> dict:
        if not ctx:
            ctx.append(_context(fp32, runs, data))
        return quantize(fp32, out, name, ctx[0])

    names = [r.name for r in recipes_for(args.quantize, runs[0].cfg.causal)]
    data = guard_records(runs, args)
    skipped = _unseen_static(data, args) if names[0] == "static" else None
    if skipped:
        names = names[1:]
    info = guard(fp32, out, runs, args, names, write, data)
    return info | ({"skipped": skipped} if skipped else {})


def _unseen_static(data: dict, args) -> dict | None:
    """Why ``static`` is not tried, or None: some task's guard records are too few for a
    loss of ``--max-drop`` to count (``guard.records_needed``). ``static`` changes about one
    label in a hundred against fp32 (three or four in a hundred after 20 training records
    a label: BANKING77, test 0.875 fp32, 0.862 ``static``, 0.875 ``weight-only``), which so
    few records cannot show; ``weight-only`` keeps fp32's labels (15 of 3,080 changed
    there, against 111), with slower MatMuls (2.6 ms a query against 1.7)."""
    needed = records_needed(args.max_drop)
    scorable = {task: sum(t is not None for t in targets) for task, (_, _, targets) in data.items()}
    few = {task: n for task, n in scorable.items() if n < needed}
    if not few:
        return None
    where = ", ".join(f"{task} {n}" for task, n in few.items())
    print(
        f"int8: too few guard records to see a loss of --max-drop {args.max_drop:g} points "
        f"({where}; {needed} needed), so 'static' is not tried: 'weight-only' keeps fp32's "
        f"labels, a little slower; --eval FILE with {needed}+ held-out records lets the "
        "guard judge 'static'",
        file=sys.stderr,
    )
    return {"recipes": ["static"], "guard_records": few, "needed": needed}
