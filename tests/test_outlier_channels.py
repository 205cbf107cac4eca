"""Outlier channels in float (``ptedge.export.outlier_channels``) inside recipe ``static``,
on a two-MatMul graph whose input has one channel 25x wider than the others: the channel
is found, the integer MatMul's scale comes from the other channels, the outputs get at
least twice closer to the float graph's than with every channel in int8, and a record's
scores still do not depend on its batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptedge.export import outlier_channels as oc
from ptedge.export.quantize import Context, quantize

C, H, D = 32, 48, 16  # input channels, hidden, output
WIDE = 5  # the outlier channel


def _graph(path: Path) -> None:
    """x (B, T, C) -> MatMul -> Relu -> MatMul -> y (B, T, D)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((C, H)) * 0.2).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((H, D)) * 0.2).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/mm1/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="/relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="/mm2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", D])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _inputs(n: int, seed: int) -> np.ndarray:
    """(n, 6, C) activations, channel WIDE 25x wider than the rest."""
    x = np.random.default_rng(seed).standard_normal((n, 6, C)).astype(np.float32)
    x[..., WIDE] *= 25
    return x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["y"], {"x": x})[0]


def _static(tmp_path: Path, name: str) -> tuple[Path, dict]:
    src, out = tmp_path / "f.onnx", tmp_path / f"{name}.onnx"
    if not src.is_file():
        _graph(src)
    calibration = [{"x": x[None]} for x in _inputs(64, seed=1)]
    return out, quantize(src, out, "static", Context(excluded=[], calibration=calibration))


def test_a_wide_channel_is_an_outlier_and_flat_or_crowded_tensors_have_none():
    lo, hi = -np.ones(100), np.ones(100)
    assert oc.outliers(lo, hi).size == 0
    hi[[7, 42]] = 9.0
    assert oc.outliers(lo, hi).tolist() == [7, 42]
    hi[: oc.MAX_CHANNELS + 1] = 9.0  # more than MAX_CHANNELS as wide: none stands out
    assert oc.outliers(lo, hi).size == 0


def test_static_int8_computes_the_outlier_channel_in_float(tmp_path, monkeypatch):
    out, facts = _static(tmp_path, "static")
    assert facts["float_channels"]["matmuls"] >= 1  # x's; the Relu output may have one too
    g = onnx.load(str(out)).graph
    assert {n.op_type for n in g.node} >= {"MatMulIntegerToFloat", "Gather", "Add"}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    assert inits["x.outliers.idx"].tolist() == [WIDE]
    # the integer MatMul's scale is set by the other channels (|x| < 5), not by WIDE's ~100
    assert float(inits["x_scale"]) < 10 / 255

    monkeypatch.setattr(oc, "FACTOR", np.inf)  # every channel in int8
    plain, facts = _static(tmp_path, "plain")
    assert facts["float_channels"]["matmuls"] == 0

    x = _inputs(32, seed=2)
    ref = _run(tmp_path / "f.onnx", x)
    err = {p.stem: np.abs(_run(p, x) - ref).mean() for p in (out, plain)}
    assert err["static"] < err["plain"] / 2, err


def test_outlier_path_keeps_answers_independent_of_the_batch(tmp_path):
    out, _ = _static(tmp_path, "static")
    x = _inputs(8, seed=3)
    alone = np.concatenate([_run(out, x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(_run(out, x), alone, atol=1e-5)


@pytest.mark.slow
def test_minilm_int8_bundle_has_float_outlier_channels(banking77_int8_bundle):
    """all-MiniLM-L6-v2 has them (one channel of every attention block's LayerNorm
    output; see the module's docstring): the shipped BANKING77 bundle records and runs them."""
    import json

    q = json.loads((banking77_int8_bundle / "ptedge.json").read_text())["quantization"]
    assert q["recipe"] == "static" and q["float_channels"]["matmuls"] >= 1
    graph = onnx.load(str(banking77_int8_bundle / "model.int8.onnx"), load_external_data=False)
    assert any(n.name.endswith(oc.SUFFIX) for n in graph.graph.node)
