"""ONNX graph rewrites the quantization recipes are made of (``ptedge.export.quantize``).

- ``static_activations``: onnxruntime's dynamic int8 graph (per-channel int8 weights,
  ``DynamicQuantizeLinear`` before each int8 MatMul or fused attention) made static: each
  ``DynamicQuantizeLinear`` becomes a ``QuantizeLinear`` whose scale and zero point were
  measured once on real records (``channel_ranges``), and each ``MatMulInteger ->
  Cast -> Mul`` chain becomes one ``MatMulIntegerToFloat``. A per-batch scale makes a
  record's answer depend on the other records of its batch; a constant one does not,
  and the per-layer min/max pass is gone.
- ``matmul_nbits``: MatMul weights as onnxruntime's ``MatMulNBits`` (4 or 8 bits, blocks
  of 32 along the input dimension, one scale per block); with accuracy level 4 it
  quantizes activations per block of each row, which no other row influences.
- ``quantize_embedding_rows`` (int8, one scale per row) and ``quantize_embedding_blocks``
  (``GatherBlockQuantized``, e.g. 4 bits in blocks of 32): the word embedding, prompt
  rows included, each row or block with its own scale. onnxruntime's own Gather
  quantization uses one scale for the whole table, which would crush the prompt rows.
- pieces other rewrites share (``ptedge.export.smooth_int8`` too): ``tensor_values``
  (intermediate tensors on calibration records), ``symmetric_int8``, ``replace_node``,
  ``insert_nodes``.

Not responsible for: choosing a recipe or checking accuracy (``ptedge.export.quantize``),
fusing (``ptedge.export.fusion``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

NBITS_BLOCK = 32  # MatMulNBits / GatherBlockQuantized block size (input dimension)
# int8 weights that an integer MatMul meets with uint8 activations stay within +-64 (7 bits).
# CPUs without an int8 dot product (AVX2, no VNNI) add pairs of uint8 x int8 products in
# saturating int16 lanes (vpmaddubsw): 255 * 127 * 2 overflows, 255 * 64 * 2 = 32,640 does
# not. So the same bundle gives the same integers on AVX2, VNNI and WebAssembly CPUs.
MATMUL_WEIGHT_PEAK = 64
# node-name prefixes of heads left in float: task heads of task graphs, the LM head of decoders
HEAD_PREFIXES = ("/heads", "/lm_head")


@contextmanager
def _quiet(name: str, level: int = logging.WARNING):
    """Silence a logger onnxruntime's quantizers chat on, below ``level``, for the block."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def quantize_dynamic_int8(src: Path, dst: Path, excluded: list[str]) -> None:
    """onnxruntime's dynamic quantization: per-channel int8 weights of the MatMuls (and
    fused ``Attention``) with constant weights, activations quantized per tensor at run
    time. The starting point of ``static_activations``. Weights are 7-bit (onnxruntime's
    ``reduce_range``, [-64, 64]; ``MATMUL_WEIGHT_PEAK``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it warns on the root logger: "Please consider to run pre-processing before quantization"
    with _quiet("root", logging.ERROR):
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            # fused ops are com.microsoft ones, which shape inference cannot type
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def tensor_values(
    source: Path, names: list[str], feeds: Iterable[dict[str, np.ndarray]]
) -> Iterator[list[np.ndarray]]:
    """The named float tensors of the graph at ``source``, one list per feed (in
    ``names`` order). The graph's weights stay where they are: the edited graph is saved
    beside ``source`` (it may read a ``.data`` file there) and removed once loaded."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(source), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names if x not in outputs
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    edited = source.with_name(source.name + ".outputs.onnx")
    onnx.save(model, str(edited))
    try:
        session = ort.InferenceSession(str(edited), opts, providers=["CPUExecutionProvider"])
    finally:
        edited.unlink()
    inputs = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield session.run(names, {k: feed[k] for k in inputs})


def channel_ranges(
    source: Path, names: list[str], feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(min, max) of each channel (last axis) of each named float tensor of the graph
    ``source`` over ``feeds`` (batches of one record: no padding enters the ranges);
    two (C,) arrays per name."""
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for values in tensor_values(source, names, feeds):
        for x, v in zip(names, values, strict=True):
            v = v.reshape(-1, v.shape[-1])  # (tokens, C)
            lo[x] = np.minimum(lo[x], v.min(0)) if x in lo else v.min(0)
            hi[x] = np.maximum(hi[x], v.max(0)) if x in hi else v.max(0)
    return {x: (lo[x], hi[x]) for x in names}


def symmetric_int8(w: np.ndarray, axis: int, peak: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """``w`` as int8 in [-peak, peak] with one float32 scale per slice along ``axis``:
    (q like w, scale with ``axis`` kept as size 1), ``w ~= q * scale``. Integer MatMul
    weights pass ``peak=MATMUL_WEIGHT_PEAK``."""
    scale = np.maximum(np.abs(w).max(axis=axis, keepdims=True), 1e-12) / peak
    q = np.clip(np.round(w / scale), -peak, peak).astype(np.int8)
    return q, scale.astype(np.float32)


def uint8_scale(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of asymmetric uint8 over [lo, hi] widened to hold 0 (the
    convention of ``DynamicQuantizeLinear``)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def static_activations(model, ranges: dict[str, tuple[float, float]]) -> int:
    """Give every ``DynamicQuantizeLinear`` of ``model`` a constant scale from ``ranges``
    (keyed by its input), in place; returns how many. Then fuse the integer MatMuls."""
    from onnx import helper, numpy_helper

    g = model.graph
    nodes = [n for n in g.node if n.op_type == "DynamicQuantizeLinear"]
    for n in nodes:
        scale, zero = uint8_scale(*ranges[n.input[0]])
        q, s, z = n.output
        g.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), s),
                numpy_helper.from_array(np.array(zero, np.uint8), z),
            ]
        )
        replace_node(
            model, n, [helper.make_node("QuantizeLinear", [n.input[0], s, z], [q], name=n.name)]
        )
    _integer_matmuls_to_float(model)
    return len(nodes)


def _integer_matmuls_to_float(model) -> None:
    """``MatMulInteger -> Cast -> Mul(·, Mul(a_scale, b_scale))`` -> ``MatMulIntegerToFloat``.

    onnxruntime fuses this pattern itself only while the scales' ``Mul`` is a node; with
    constant scales it is folded first and the three nodes would stay apart. A chain
    that does not match (an output used twice) is left as it is: slower, same result.
    """
    from onnx import helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def only(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    for mm in [n for n in g.node if n.op_type == "MatMulInteger"]:
        cast = only(mm.output[0], "Cast")
        mul = cast and only(cast.output[0], "Mul")
        other = mul and [x for x in mul.input if x != cast.output[0]]
        scales = other and producer.get(other[0])
        quant = producer.get(mm.input[0])
        if not scales or scales.op_type != "Mul" or len(consumers[scales.output[0]]) != 1:
            continue
        if quant is None or quant.op_type != "QuantizeLinear" or quant.input[1] not in scales.input:
            continue
        a_scale = quant.input[1]
        b_scale = [x for x in scales.input if x != a_scale][0]
        zeros = list(mm.input[2:4]) + [""] * (4 - len(mm.input))
        fused = helper.make_node(
            "MatMulIntegerToFloat",
            [mm.input[0], mm.input[1], a_scale, b_scale, *zeros[:2]],
            [mul.output[0]],
            name=mm.name,
            domain="com.microsoft",
        )
        pos = list(g.node).index(mm)
        for n in (mm, cast, mul, scales):
            g.node.remove(n)
        g.node.insert(pos, fused)


def matmul_nbits(model, bits: int, level: int, excluded: list[str]):
    """``model`` with its constant-weight MatMuls as ``MatMulNBits`` (``bits`` 4 or 8,
    symmetric, blocks of ``NBITS_BLOCK``, ``accuracy_level`` ``level``: 4 = int8
    activations per block of each row, 1 = float arithmetic)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=level, bits=bits
    )
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        q = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=NBITS_BLOCK,
            is_symmetric=True,
            accuracy_level=level,
            nodes_to_exclude=excluded,
            algo_config=config,
        )
        q.process()
    return q.model.model


def _embedding_gather(model):
    """The word-embedding Gather: the one reading the largest 2-D initializer, which
    nothing else reads (a table tied to an LM head stays float). None if there is none."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    best, size = None, 0
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and readers[n.input[0]] == 1:
            dims = inits[n.input[0]].dims
            if len(dims) == 2 and dims[0] * dims[1] > size:
                best, size = n, dims[0] * dims[1]
    return best, inits


def replace_node(model, old, new: list) -> None:
    """Put the nodes ``new`` where ``old`` was, in place (keeps the graph's order)."""
    g = model.graph
    pos = list(g.node).index(old)
    g.node.remove(old)
    insert_nodes(g, pos, new)


def insert_nodes(graph, pos: int, nodes: list) -> None:
    """Put ``nodes`` into ``graph`` at position ``pos``, in order, in place."""
    for k, n in enumerate(nodes):
        graph.node.insert(pos + k, n)


def quantize_embedding_rows(model) -> str | None:
    """The word embedding as int8 rows with one scale per row (a Gather of rows, a Gather
    of scales, a Mul), in place. Returns the table's name, or None if there is none."""
    from onnx import TensorProto, helper, numpy_helper

    node, inits = _embedding_gather(model)
    if node is None:
        return None
    name = node.input[0]
    w = numpy_helper.to_array(inits[name]).astype(np.float32)  # (R, H)
    q, scale = symmetric_int8(w, axis=1)  # (R, H), (R, 1)
    model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, f"{name}.int8"),
            numpy_helper.from_array(scale, f"{name}.scale"),
        ]
    )
    ids, out = node.input[1], node.output[0]
    replace_node(
        model,
        node,
        [
            helper.make_node("Gather", [f"{name}.int8", ids], [f"{out}.q"], name=f"{node.name}.q"),
            helper.make_node(
                "Cast", [f"{out}.q"], [f"{out}.f"], to=TensorProto.FLOAT, name=f"{node.name}.cast"
            ),
            helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.s"], name=f"{node.name}.s"),
            helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{node.name}.mul"),
        ],
    )
    return name


def quantize_embedding_blocks(model, bits: int = 4, block: int = NBITS_BLOCK) -> str | None:
    """The word embedding as ``GatherBlockQuantized``: ``bits``-bit symmetric values in
    blocks of ``block`` along each row, one scale per block, in place. Returns the
    table's name, or None if there is none or its width is not a multiple of ``block``."""
    from onnx import helper, numpy_helper

    node, inits = _embedding_gather(model)
    if node is None or inits[node.input[0]].dims[1] % block:
        return None
    name = node.input[0]
    w = numpy_helper.to_array(inits[name]).astype(np.float32)  # (R, H)
    rows, width = w.shape
    blocks = w.reshape(rows, width // block, block)  # (R, H/b, b)
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / qmax  # (R, H/b)
    q = np.clip(np.round(blocks / scale[..., None]), -qmax - 1, qmax).reshape(rows, width)
    offset = 2 ** (bits - 1)  # stored unsigned, with the default zero point
    u = (q + offset).astype(np.uint8)  # (R, H)
    data = u if bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    inputs = [f"{name}.q{bits}", node.input[1], f"{name}.scale"]
    tables = [
        numpy_helper.from_array(data, inputs[0]),
        numpy_helper.from_array(scale.astype(np.float32), inputs[2]),
    ]
    if bits == 8:  # uint8 data has no default zero point
        inputs.append(f"{name}.zero")
        tables.append(
            numpy_helper.from_array(np.full(scale.shape, offset, np.uint8), f"{name}.zero")
        )
    model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend(tables)
    replace_node(
        model,
        node,
        [
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                list(node.output),
                name=f"{node.name}.q{bits}",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block,
                bits=bits,
            )
        ],
    )
    return name
