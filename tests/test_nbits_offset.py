"""4-bit weights with float block offsets (``ptedge.export.nbits_offset``): exact on a
min-max 4-bit grid (GGUF Q4_1, the form SmolLM2 reaches this machine in), half a step
otherwise, and the rewritten graph computes ``A @ W`` in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptedge.export import nbits_offset


def q4_1_grid(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Weights (K, N) as a Q4_1 file de-quantizes them: d * q + m per block of 32 along K."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's min to 0 and max to 15
    d = rng.uniform(1e-3, 2e-2, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.2, 0.0, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    return (d * q + m).astype(np.float32).reshape(n, k).T


def test_a_q4_1_grid_is_represented_exactly():
    w = q4_1_grid(96, 40)
    packed, scales, offsets = nbits_offset.quantize(w)
    assert packed.shape == (40, 3, 16) and scales.shape == (120,) and offsets.shape == (3, 40)
    assert np.abs(nbits_offset.dequantize(packed, scales, offsets) - w).max() < 1e-6


def test_other_weights_round_to_half_a_step():
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    packed, scales, offsets = nbits_offset.quantize(w)
    err = np.abs(nbits_offset.dequantize(packed, scales, offsets) - w)  # (K, N)
    step = np.repeat(scales.reshape(8, 2).T, 32, axis=0)  # (K, N): each weight's block step
    assert (err <= step / 2 + 1e-6).all() and err.max() > 1e-3


def test_a_constant_block_needs_no_step():
    w = np.full((32, 2), 0.25, dtype=np.float32)
    packed, scales, offsets = nbits_offset.quantize(w)
    assert np.abs(nbits_offset.dequantize(packed, scales, offsets) - w).max() == 0.0


def test_rejects_k_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="multiple of the block size"):
        nbits_offset.quantize(np.zeros((40, 4), dtype=np.float32))


def _graph(k: int, ns: list[int]):
    """A builder-like graph: two 8-bit MatMulNBits nodes reading the same input (B, T, K)
    (their weights are placeholders: ``rewrite`` replaces them) and one outside
    ``/model/layers.`` that must stay 8-bit."""
    nodes, inits, outs = [], [], []
    for i, n in enumerate(ns + [4]):
        w = f"model.layers.0.p{i}.MatMul.weight" if i < len(ns) else "lm_head.MatMul.weight"
        name = f"/model/layers.0/p{i}/MatMul_Q8" if i < len(ns) else "/lm_head/MatMul_Q8"
        inits += [
            numpy_helper.from_array(np.zeros((n, k // 32, 32), np.uint8), w + "_Q8"),
            numpy_helper.from_array(np.ones(n * k // 32, np.float32), w + "_scales"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", w + "_Q8", w + "_scales"],
                [f"Y{i}"],
                name=name,
                domain="com.microsoft",
                K=k,
                N=n,
                bits=8,
                block_size=32,
                accuracy_level=1,
            )
        )
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k])],
        outs,
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def test_rewritten_graph_computes_the_float_product():
    k, ns = 64, [24, 40]
    weights = {f"model.layers.0.p{i}.MatMul.weight": q4_1_grid(k, n, i) for i, n in enumerate(ns)}
    model = _graph(k, ns)
    info = nbits_offset.rewrite(model, weights)
    assert info["matmuls"] == 2 and info["max_abs_error"] < 1e-6
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ReduceSum") == 1  # one block sum per distinct input
    bits = {
        n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits == {
        "/model/layers.0/p0/MatMul_Q8": 4,
        "/model/layers.0/p1/MatMul_Q8": 4,
        "/lm_head/MatMul_Q8": 8,
    }
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(2).standard_normal((2, 5, k)).astype(np.float32)
    got = s.run(None, {"A": a})
    for i in range(len(ns)):
        want = a @ weights[f"model.layers.0.p{i}.MatMul.weight"]
        assert np.abs(got[i] - want).max() < 1e-4 * max(1.0, np.abs(want).max())
