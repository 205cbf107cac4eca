"""ptedge.export.mobile: a bundle's model in ORT format gives the ONNX model's scores."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import write_jsonl  # noqa: E402

from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.export.mobile import OrtConversionError, convert_to_ort  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.template import encode  # noqa: E402
from ptedge.train import TrainArgs, train  # noqa: E402

RECORDS = [
    {"sentence": s, "label": str(i % 2)}
    for i, s in enumerate(
        [
            "good fun for the whole family",
            "the movie was great",
            "a terrible boring film",
            "bad plot",
            "my card has not arrived yet",
            "the official language of france is french " * 3,
        ]
    )
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=[None, "int8"])
def bundle(request, tiny, tmp_path_factory):
    """A tiny BERT bundle (linear head), fp32 or int8."""
    root = tmp_path_factory.mktemp(f"mobile-{request.param or 'fp32'}")
    data = write_jsonl(root / "train.jsonl", RECORDS * 2)
    run = root / "run"
    args = TrainArgs(
        model=str(tiny("bert")),
        train=str(data),
        template="[P:2] {sentence} [P:2] it was [MASK] .",
        head="linear",
        steps=3,
        batch_size=4,
        out=str(run),
    )
    train(args, progress=False)
    out = root / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(out), quantize=request.param, max_drop=100.0))
    return out


def _feeds(bundle) -> tuple[dict, str]:
    p = Predictor(bundle)
    _, spec = p.task(None)
    enc = encode(spec["template"], p.tokenizer, RECORDS)
    feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "slot": enc.slot}
    inputs = {i.name for i in p.session.get_inputs()}  # a mean-pooling head reads no slot
    return {k: v for k, v in feeds.items() if k in inputs}, spec["output"]


def test_ort_format_matches_onnx(bundle):
    model = Predictor(bundle).manifest["model"]
    feeds, output = _feeds(bundle)
    entry = convert_to_ort(bundle, model, feeds=feeds)
    stem = model.removesuffix(".onnx")
    assert entry["file"] == f"{stem}.ort" and entry["source"] == model
    assert entry["operators_config"] == f"{stem}.required_operators.config"
    assert entry["onnxruntime_version"] == ort.__version__
    assert entry["optimization_level"] == "all"
    assert entry["parity"]["n"] == len(RECORDS) and entry["parity"]["labels_equal"] == 1.0
    config = (bundle / entry["operators_config"]).read_text()
    assert "ai.onnx;" in config and str(bundle) not in config  # no temporary paths

    ref = ort.InferenceSession(str(bundle / model), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(bundle / entry["file"]), providers=["CPUExecutionProvider"])
    a = ref.run([output], feeds)[0]
    b = got.run([output], feeds)[0]
    assert a.shape == b.shape == (len(RECORDS), 2)
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_ort_format_default_probe_and_levels(bundle):
    model = Predictor(bundle).manifest["model"]
    for level in ("basic", "extended"):
        entry = convert_to_ort(bundle, model, optimization=level)
        assert entry["optimization_level"] == level and entry["parity"]["n"] == 2
        assert entry["parity"]["max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="optimization"):
        convert_to_ort(bundle, model, optimization="max")
    with pytest.raises(FileNotFoundError):
        convert_to_ort(bundle, "missing.onnx")


def test_ort_conversion_error_names_the_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(OrtConversionError, match="model.onnx"):
        convert_to_ort(tmp_path, "model.onnx")
    assert not (tmp_path / "model.ort").exists()


def test_mobile_is_torch_free(bundle):
    """Converting loads no torch, although onnxruntime/tools/__init__.py would."""
    code = (
        "import sys; from pathlib import Path; from ptedge.export.mobile import convert_to_ort; "
        "from ptedge.runtime import load_manifest; "
        f"b = Path({str(bundle)!r}); convert_to_ort(b, load_manifest(b)['model']); "
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
