"""Outlier channels of static int8 MatMul inputs, computed in float (recipe ``static``).

A BERT-family encoder's hidden states have a few channels whose values reach several
times any other channel's. all-MiniLM-L6-v2 on BANKING77: one channel of each attention
block's LayerNorm output spans 24-31 where the next spans 10-15, and one or two channels
of the first four layers' GELU output span 14-24 against 6-7. With one activation scale
per tensor those few channels set the scale, and every other channel is quantized with
steps two to four times coarser than it needs. Here they leave the int8 path: the
MatMul's input is multiplied by a 0/1 mask before it is quantized (its scale set by the
other channels), and the outlier channels' product with their float weight rows is added
to the integer MatMul's output (LLM.int8()'s decomposition, Dettmers et al. 2022, with
the channels chosen once at export from the calibration records, not per batch, so a
record's answer still does not depend on its batch):

    y = MatMulIntegerToFloat(Q(x * mask), Wq) + x[..., K] @ W[K, :]

A channel is an outlier when its range over the calibration records exceeds ``FACTOR``
times the range of the tensor's (``MAX_CHANNELS`` + 1)-th widest channel, so a tensor has
at most ``MAX_CHANNELS`` of them; a tensor read by anything but integer MatMuls (fused
attention quantizes its own input) is left as it was.

Not responsible for: the calibration records or the other rewrites of the static recipe
(``ptedge.export.quant_graph``), choosing a recipe (``ptedge.export.quantize``).
"""

from __future__ import annotations

import numpy as np

from ptedge.export.quant_graph import insert_nodes

FACTOR = 2.0  # an outlier spans more than FACTOR x the widest channel past MAX_CHANNELS
MAX_CHANNELS = 8  # float channels per tensor, at most
SUFFIX = ".outliers"  # node and initializer names of the float path: <tensor>.outliers.*


def outliers(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Indices of the outlier channels of a tensor whose channels span [lo, hi] (each
    (C,), widened to hold 0); empty when there are none."""
    span = np.maximum(hi, 0) - np.minimum(lo, 0)  # (C,)
    if len(span) <= MAX_CHANNELS:
        return np.zeros(0, np.int64)
    ref = np.sort(span)[::-1][MAX_CHANNELS]  # the widest span past the MAX_CHANNELS widest
    return np.flatnonzero(span > FACTOR * ref)


def plan(model, ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Tensor -> outlier channels, for the tensors of ``ranges`` (``channel_ranges``) that
    only ``MatMulInteger`` nodes of ``model`` (onnxruntime's dynamic int8 graph) read
    through their ``DynamicQuantizeLinear``."""
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n.op_type)
    chosen = {}
    for n in model.graph.node:
        if n.op_type != "DynamicQuantizeLinear" or n.input[0] not in ranges:
            continue
        if set(readers.get(n.output[0], [])) != {"MatMulInteger"}:
            continue
        idx = outliers(*ranges[n.input[0]])
        if len(idx):
            chosen[n.input[0]] = idx
    return chosen


def float_weights(float_model, chosen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MatMul node name -> its constant (C, O) weight, for the MatMuls of the float graph
    ``float_model`` that read a tensor of ``chosen``."""
    from onnx import numpy_helper

    inits = {i.name: i for i in float_model.graph.initializer}
    return {
        n.name: numpy_helper.to_array(inits[n.input[1]])
        for n in float_model.graph.node
        if n.op_type == "MatMul" and n.input[0] in chosen and n.input[1] in inits
    }


def tensor_range(lo: np.ndarray, hi: np.ndarray, skip: np.ndarray | None) -> tuple[float, float]:
    """The (min, max) a tensor's int8 scale is set from: over its channels but ``skip``."""
    keep = np.ones(len(lo), bool)
    if skip is not None:
        keep[skip] = False
    return float(lo[keep].min()), float(hi[keep].max())


def add_float_path(model, chosen: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict:
    """Rewrite ``model`` (static int8, after ``quant_graph.static_activations``) in place:
    each tensor of ``chosen`` is masked before its ``QuantizeLinear``, and each
    ``MatMulIntegerToFloat`` reading it gets its outlier channels' float product added.
    ``weights``: a MatMul node's name in the float graph -> its (C, O) weight; the integer
    node is that name + ``_quant`` (onnxruntime's quantizer names it so). Returns what
    was done, for the manifest."""
    from onnx import helper, numpy_helper

    g = model.graph
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    matmuls = channels = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in chosen]:
        x, idx = q.input[0], chosen[q.input[0]]
        users = readers[q.output[0]]
        if any(
            u.op_type != "MatMulIntegerToFloat" or u.name.removesuffix("_quant") not in weights
            for u in users
        ):
            continue  # the static rewrite left this chain unfused: keep it as it was
        tag = x + SUFFIX
        width = weights[users[0].name.removesuffix("_quant")].shape[0]
        mask = np.ones(width, np.float32)  # (C,)
        mask[idx] = 0
        g.initializer.extend(
            [
                numpy_helper.from_array(mask, f"{tag}.mask"),
                numpy_helper.from_array(idx.astype(np.int64), f"{tag}.idx"),
            ]
        )
        mask_node = helper.make_node("Mul", [x, f"{tag}.mask"], [f"{tag}.masked"], name=tag)
        gather = helper.make_node(
            "Gather", [x, f"{tag}.idx"], [f"{tag}.x"], name=f"{tag}.gather", axis=-1
        )
        insert_nodes(g, list(g.node).index(q), [mask_node, gather])
        q.input[0] = f"{tag}.masked"
        for k, mm in enumerate(users):
            w = weights[mm.name.removesuffix("_quant")][idx]  # (K, O)
            y, part = mm.output[0], f"{tag}.{k}"
            g.initializer.append(numpy_helper.from_array(w.astype(np.float32), f"{part}.w"))
            mm.output[0] = f"{part}.int8"
            product = helper.make_node(
                "MatMul", [f"{tag}.x", f"{part}.w"], [f"{part}.float"], name=f"{part}.matmul"
            )
            total = helper.make_node("Add", [f"{part}.int8", f"{part}.float"], [y], name=part)
            insert_nodes(g, list(g.node).index(mm) + 1, [product, total])
            matmuls += 1
        channels += len(idx)
    return {"matmuls": matmuls, "channels": channels, "factor": FACTOR}
