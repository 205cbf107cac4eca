"""Smoothed per-token int8 (``ptedge.export.smooth_int8``) on a small Llama-like block in
onnxruntime: smoothing leaves the float graph's outputs as they were, the integer graph
stays close to them, heads stay float, and a record's scores do not depend on its batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ptedge.export import decoder_graph, smooth_int8
from ptedge.export.quant_graph import MATMUL_WEIGHT_PEAK

H, F = 64, 96  # hidden and MLP sizes


def _block(path: Path, seed: int = 0) -> None:
    """x (B, T, H) -> RMSNorm -> q, k projections; silu(gate) * up -> down; a head
    ``/heads/out`` on the sum. One channel of x runs 50x larger (an outlier channel)."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.1):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, H).astype(np.float32), "gamma"),
        w("wq", H, H),
        w("wk", H, H),
        w("wgate", H, F),
        w("wup", H, F),
        w("wdown", F, H),
        w("whead", H, 3),
    ]
    mm = [
        ("wq", "n", "q"),
        ("wk", "n", "k"),
        ("wgate", "n", "gate"),
        ("wup", "n", "up"),
        ("wdown", "act", "down"),
    ]
    nodes = [
        helper.make_node(
            "SimplifiedLayerNormalization", ["x", "gamma"], ["n"], axis=-1, epsilon=1e-6
        ),
        *(helper.make_node("MatMul", [x, wn], [y], name=f"/layer/{y}/MatMul") for wn, x, y in mm),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["act"]),
        helper.make_node("Add", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "down"], ["h"]),
        helper.make_node("MatMul", ["h", "whead"], ["scores"], name="/heads/out/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", H])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "T", 3])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    decoder_graph.save(model, path)


def _x(rng, b: int, t: int = 5) -> np.ndarray:
    x = rng.standard_normal((b, t, H)).astype(np.float32)
    x[..., 7] *= 50.0  # outlier channel
    return x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["scores"], {"x": x})[0]


def test_groups_are_the_projections_not_the_head(tmp_path):
    _block(tmp_path / "m.onnx")
    found = smooth_int8.groups(onnx.load(str(tmp_path / "m.onnx")))
    assert {x: sorted(m.name for m in mms) for x, mms in found.items()} == {
        "n": sorted(f"/layer/{y}/MatMul" for y in ("q", "k", "gate", "up")),
        "act": ["/layer/down/MatMul"],
    }


def test_channel_peaks_average_each_records_largest_magnitude(tmp_path):
    _block(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": _x(rng, 1, t)} for t in (3, 5, 8)]
    peaks = smooth_int8.channel_peaks(tmp_path / "m.onnx", ["x"], feeds)["x"]
    want = np.mean([np.abs(f["x"][0]).max(0) for f in feeds], axis=0)  # (H,)
    np.testing.assert_allclose(peaks, want, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no leftovers


def test_smoothing_keeps_the_float_outputs(tmp_path):
    src = tmp_path / "m.onnx"
    _block(src)
    rng = np.random.default_rng(2)
    feeds = [{"x": _x(rng, 1)} for _ in range(4)]
    model = decoder_graph.load(src)
    peaks = smooth_int8.channel_peaks(src, list(smooth_int8.groups(model)), feeds)
    done = smooth_int8.smooth(model, peaks)
    assert done == {"norm": 1, "up_proj": 1, "none": 0}
    decoder_graph.save(model, tmp_path / "s.onnx")
    x = _x(rng, 2)
    ref = _run(src, x)
    np.testing.assert_allclose(
        _run(tmp_path / "s.onnx", x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()
    )


def test_integer_graph_is_close_and_batch_independent(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _block(src)
    rng = np.random.default_rng(3)
    facts = smooth_int8.write(src, out, [{"x": _x(rng, 1)} for _ in range(8)])
    assert facts["integer_matmuls"] == 5 and facts["weight_peak"] == MATMUL_WEIGHT_PEAK
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 5 and ops.count("MatMul") == 1  # the head
    # 7-bit weights: AVX2's saturating int16 pair sums cannot overflow (255 * 64 * 2)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) <= MATMUL_WEIGHT_PEAK

    x = _x(rng, 3)
    ref, got = _run(src, x), _run(out, x)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    # a record alone and beside others: the same scores (scales are per token)
    np.testing.assert_allclose(_run(out, x[1:2]), got[1:2], rtol=1e-6, atol=1e-6)


def test_uint8_by_7bit_weights_is_exact_on_this_cpu():
    """The integer MatMul onnxruntime runs here, at the extremes the recipes allow (uint8
    activations up to 255, weights within +-MATMUL_WEIGHT_PEAK), equals exact integer
    arithmetic: no CPU's kernel saturates, so every CPU gives the same integers. (At +-127,
    an AVX2 CPU without VNNI got 99.8% of these outputs wrong.)"""
    rng = np.random.default_rng(0)
    k, n = 384, 64
    p = MATMUL_WEIGHT_PEAK
    w = rng.choice(np.array([-p, p], np.int8), size=(k, n))  # (K, N), worst case
    a = np.full((4, k), 255, np.uint8)  # (B, K)
    a[1] = rng.integers(0, 256, size=k)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))
