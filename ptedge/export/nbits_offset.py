"""4-bit weights with a float offset per block, for the builder's decoder graphs.

onnxruntime's fast ``MatMulNBits`` kernels take 4-bit weights ``q`` (0..15) in blocks of
32 along K with one scale each and an *integer* zero point (8 when absent):
``w = scale * (q - 8)``. A float zero point is allowed by the operator but runs a
dequantize-then-multiply path, measured 4-5x slower here. Min-max ("asymmetric") 4-bit
quantization, as GGUF's Q4_1 stores it, needs a float offset per block:
``w = d * q + m`` with ``d = (max - min) / 15``, ``m = min``. Rewritten as
``w = d * (q - 8) + c`` with ``c = m + 8 d``, the product splits into

    A @ W  =  MatMulNBits(A; q, d)  +  blocksum(A) @ C        A: (..., K), C: (K/32, N)

where ``blocksum(A)`` (..., K/32) sums each block of 32 activations: one small float
``MatMul`` (1/32 of the main one's arithmetic) beside each 4-bit one, and one
``Reshape`` + ``ReduceSum`` per distinct input (qkv; o; gate and up share one; down).

Why: SmolLM2-135M reaches this machine as a Q4_1 GGUF (``ptedge.backbones``): every
projection already *is* a 4-bit min-max grid in blocks of 32 along K, so this recipe
represents it exactly (largest weight error ~1e-7), where symmetric round-to-nearest
4-bit adds a second rounding (P36 dev exact match 0.804 -> 0.645). On other weights it is
plain min-max 4-bit quantization, which rounds to half a step as any 4-bit grid does.

Not responsible for: building graphs (``ptedge.export.builder``), choosing a recipe
(``ptedge.export.causal``), the LM head and embedding (left as the builder wrote them).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def quantize(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max 4-bit blocks of ``w`` (K, N) along K: (packed (N, K/block, block/2) uint8,
    scales (N * K/block,) float32, offsets C (K/block, N) float32) with
    ``w[k, n] == scales[n, b] * (q[k, n] - 8) + C[b, n]`` for ``b = k // block``."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"K = {k} is not a multiple of the block size {block}")
    blocks = w.T.astype(np.float64).reshape(n, k // block, block)  # (N, K/b, b)
    lo, hi = blocks.min(-1), blocks.max(-1)  # (N, K/b)
    d = (hi - lo) / 15.0
    step = np.where(d > 0, d, 1.0)
    q = np.clip(np.rint((blocks - lo[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # low nibble: even k, high nibble: odd k
    offsets = (lo + 8.0 * d).T.astype(np.float32)  # (K/b, N)
    return packed, d.astype(np.float32).reshape(-1), offsets


def dequantize(packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The weights (K, N) that ``quantize``'s output stands for (used by tests and the
    exactness report)."""
    n, nb, half = packed.shape
    q = np.empty((n, nb, 2 * half), dtype=np.float64)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    w = scales.reshape(n, nb, 1).astype(np.float64) * (q - 8.0) + offsets.T[..., None]
    return w.reshape(n, nb * 2 * half).T


def rewrite(model, weights: dict[str, np.ndarray], prefix: str = "/model/layers.") -> dict:
    """Turn the 8-bit ``MatMulNBits`` nodes of ``model`` whose name starts with ``prefix``
    into 4-bit ones with float offsets, in place. ``weights``: the float weight (K, N) of
    each, keyed by the node's weight initializer name without its ``_Q8`` suffix (the
    builder's fp32 graph names them so). Returns {"matmuls": count, "max_abs_error":
    largest |w - dequantized w|, "max_abs_weight": largest |w|}."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: i for i, t in enumerate(g.initializer)}
    sums: dict[str, str] = {}  # input -> its block sums
    new_nodes, err, top, count = [], 0.0, 0.0, 0
    for node in list(g.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (
            node.op_type == "MatMulNBits" and node.name.startswith(prefix) and attrs["bits"] == 8
        ):
            new_nodes.append(node)
            continue
        if len(node.input) > 3 or attrs["block_size"] != BLOCK:
            raise ValueError(f"{node.name}: expected 8-bit blocks of {BLOCK} without zero points")
        w = weights[node.input[1].removesuffix("_Q8")]
        packed, scales, offsets = quantize(w)
        err = max(err, float(np.abs(dequantize(packed, scales, offsets) - w).max()))
        top = max(top, float(np.abs(w).max()))
        base = node.input[1].removesuffix("_Q8")
        for name, value in ((node.input[1], packed), (node.input[2], scales)):
            g.initializer[inits[name]].CopyFrom(numpy_helper.from_array(value, name))
        g.initializer.append(numpy_helper.from_array(offsets, base + "_offsets"))
        for a in node.attribute:
            if a.name == "bits":
                a.i = 4
        src, out = node.input[0], node.output[0]
        if src not in sums:
            sums[src] = f"{src}.block_sums"
            k = attrs["K"]
            new_nodes += [
                helper.make_node(
                    "Reshape",
                    [src, base + "_blocks_shape"],
                    [src + ".blocks"],
                    name=f"{src}/Blocks",
                ),
                helper.make_node(
                    "ReduceSum",
                    [src + ".blocks", "ptedge.nbits_offset.last_axis"],
                    [sums[src]],
                    name=f"{src}/BlockSums",
                    keepdims=0,
                ),
            ]
            g.initializer.append(
                numpy_helper.from_array(
                    np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64), base + "_blocks_shape"
                )
            )
        node.output[0] = out + ".q4"
        new_nodes += [
            node,
            helper.make_node(
                "MatMul",
                [sums[src], base + "_offsets"],
                [out + ".offset"],
                name=node.name + "/Offset",
            ),
            helper.make_node(
                "Add", [out + ".q4", out + ".offset"], [out], name=node.name + "/AddOffset"
            ),
        ]
        count += 1
    if count:
        g.initializer.append(
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "ptedge.nbits_offset.last_axis")
        )
    del g.node[:]
    g.node.extend(new_nodes)
    return {"matmuls": count, "max_abs_error": err, "max_abs_weight": top}


def float_weights(model, prefix: str = "model.layers.") -> dict[str, np.ndarray]:
    """The float ``MatMul`` weights (K, N) of the builder's fp32 graph ``model`` whose
    initializer names start with ``prefix``, by name."""
    from onnx import numpy_helper

    names = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name in names and t.name.startswith(prefix)
    }
