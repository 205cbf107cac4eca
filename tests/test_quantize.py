"""Quantized bundles on tiny backbones: every int8/int4 recipe answers a record the same in
any batch, the guard refuses or (only when asked) writes past --max-drop, the manifest
names its data files without their paths, heads stay float, embeddings keep per-row or
per-block scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from conftest import write_jsonl  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from ptedge.config import RunConfig  # noqa: E402
from ptedge.data import read_records  # noqa: E402
from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.export.bundle import sha256_file  # noqa: E402
from ptedge.export.fusion import encoder_shape  # noqa: E402
from ptedge.export.quant_graph import MATMUL_WEIGHT_PEAK  # noqa: E402
from ptedge.export.quantize import Context, excluded_nodes, quantize, recipes_for  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.template import encode  # noqa: E402
from ptedge.train import DEV_NONE, TrainArgs, train  # noqa: E402

WORDS = "good fun great wonderful actors bad plot terrible boring film movie the was a".split()


def _varied_file(path, n: int = 24):
    """Labelled sentences of 1 to 12 words: batches of them need padding."""
    rng = np.random.default_rng(0)
    recs = [
        {"sentence": " ".join(rng.choice(WORDS, size=1 + i % 12)), "label": str(i % 2)}
        for i in range(n)
    ]
    return write_jsonl(path, recs)


@pytest.fixture(scope="module")
def tiny_runs(tiny, tmp_path_factory):
    """kind -> a few-step run on a tiny backbone (BERT with a linear head, Llama with a
    verbalizer) and its data file."""
    root = tmp_path_factory.mktemp("quant")
    data = _varied_file(root / "data.jsonl")
    runs = {}
    for kind, head, template, verb in (
        ("bert", "linear", "[P:2] {sentence} [MASK]", None),
        ("llama", "lm", "[P:2] {sentence} [P] It was [MASK]", {"0": "bad", "1": "good"}),
    ):
        run = root / kind
        train(
            TrainArgs(
                model=str(tiny(kind)),
                train=str(data),
                dev=DEV_NONE,
                template=template,
                head=head,
                verbalizer=verb,
                steps=4,
                batch_size=4,
                out=str(run),
            ),
            progress=False,
        )
        runs[kind] = run
    return runs, data


def _export(run, out, data, **kw):
    return export(ExportArgs(runs=[str(run)], out=str(out), eval_file=str(data), **kw))


RECIPE_CASES = [
    ("bert", "static"),
    ("bert", "weight-only"),
    ("bert", "weight-only-float"),
    ("bert", "int4"),
    ("bert", "int4-float"),
    ("llama", "weight-only"),
    ("llama", "int4"),
]


@pytest.mark.parametrize("kind,name", RECIPE_CASES)
def test_recipe_answers_do_not_depend_on_the_batch(tiny_runs, tmp_path, kind, name):
    """Scores of each record alone equal its scores in batches of 5 and of all records."""
    runs, data = tiny_runs
    bundle = tmp_path / "fp32"
    _export(runs[kind], bundle, data)
    p = Predictor(bundle)
    spec = p.tasks[kind]
    recs = list(read_records(data))

    def feeds(batch):
        enc = encode(spec["template"], p.tokenizer, batch)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "slot": enc.slot}

    fp32 = bundle / "model.onnx"
    ctx = Context(
        excluded=excluded_nodes(onnx.load(str(fp32), load_external_data=False)),
        encoder=encoder_shape(RunConfig.load(runs[kind]).model),
        calibration=[feeds([r]) for r in recs[:8]],
    )
    out = tmp_path / "q.onnx"
    info = quantize(fp32, out, name, ctx)
    assert info["recipe"] == name
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}

    def scores(batch):
        f = {k: v for k, v in feeds(batch).items() if k in names}
        return s.run([spec["output"]], f)[0]

    alone = np.concatenate([scores([r]) for r in recs])
    fives = np.concatenate([scores(recs[i : i + 5]) for i in range(0, len(recs), 5)])
    together = scores(recs)
    assert np.abs(fives - alone).max() <= 1e-5
    assert np.abs(together - alone).max() <= 1e-5


def test_static_int8_graph_has_constant_scales_and_float_heads(tiny_runs, tmp_path):
    runs, data = tiny_runs
    m = _export(runs["bert"], tmp_path / "int8", data, quantize="int8", max_drop=100)
    q = m["quantization"]
    assert (q["recipe"], q["precision"]) == ("static", "int8")
    assert q["fused_ops"]["Attention"] == 2  # the tiny BERT's two layers
    graph = onnx.load(str(tmp_path / "int8" / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QAttention", "QuantizeLinear", "MatMulIntegerToFloat"} <= ops
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    integer = [n.name for n in graph.node if n.op_type in ("MatMulIntegerToFloat", "QAttention")]
    assert not [n for n in integer if n.startswith("/heads")]  # the linear head stays float
    heads = [n for n in graph.node if n.name.startswith("/heads")]
    assert {n.op_type for n in heads} & {"Gemm", "MatMul"}
    inits = {i.name: i for i in graph.initializer}
    # integer MatMul weights are 7-bit, so AVX2 CPUs (saturating int16 pair sums) give
    # the same integers as VNNI ones
    integer_ops = ("MatMulIntegerToFloat", "QAttention")
    weights = [n.input[1] for n in graph.node if n.op_type in integer_ops]
    assert q["weight_peak"] == MATMUL_WEIGHT_PEAK
    assert weights and all(
        np.abs(numpy_helper.to_array(inits[w]).astype(int)).max() <= MATMUL_WEIGHT_PEAK
        for w in weights
    )
    table = [n for n in inits if n.endswith(".int8")]
    assert len(table) == 1
    rows = inits[table[0]].dims[0]
    assert list(inits[table[0].replace(".int8", ".scale")].dims) == [rows, 1]  # one per row
    assert q["calibration"]["bert"] == {
        "file": data.name,
        "sha256": sha256_file(data),
        "n": len(read_records(data)),
    }


def test_int4_has_4bit_blocks_keeps_labels_and_converts_to_ort(tiny_runs, tmp_path):
    runs, data = tiny_runs
    _export(runs["bert"], tmp_path / "fp32", data)
    m = _export(runs["bert"], tmp_path / "int4", data, quantize="int4", max_drop=100, format="ort")
    assert m["model"] == "model.int4.onnx"
    assert m["ort"]["file"] == "model.int4.ort" and m["ort"]["parity"]["labels_equal"] == 1.0
    assert m["quantization"]["recipe"] == "int4"
    graph = onnx.load(str(tmp_path / "int4" / "model.int4.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = {(a.name, a.i) for n in nbits for a in n.attribute}
    assert nbits and {("bits", 4), ("block_size", 32), ("accuracy_level", 4)} <= attrs
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert {(a.name, a.i) for a in gather.attribute} >= {("bits", 4), ("block_size", 32)}
    assert "SkipLayerNormalization" in {n.op_type for n in graph.node}
    recs = list(read_records(data))
    a, _ = Predictor(tmp_path / "fp32").scores(recs)
    b, _ = Predictor(tmp_path / "int4").scores(recs)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_too_few_guard_records_skip_static_for_label_keeping_weights(tiny_runs, tmp_path, capsys):
    """24 guard records cannot hold a loss of 1 point against a recipe (500 can), so the
    encoder gets weight-only int8 blocks, with the word embedding int8 per row."""
    runs, data = tiny_runs
    m = _export(runs["bert"], tmp_path / "int8", data, quantize="int8")
    q = m["quantization"]
    assert q["recipe"] == "weight-only"
    assert q["skipped"] == {"recipes": ["static"], "guard_records": {"bert": 24}, "needed": 500}
    assert "'static' is not tried" in capsys.readouterr().err
    graph = onnx.load(str(tmp_path / "int8" / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and not ops & {"QAttention", "MatMulIntegerToFloat"}
    inits = {i.name: i for i in graph.initializer}
    (table,) = [n for n in inits if n.endswith(".int8")]  # the embedding, one scale a row
    assert q["embedding"] and list(inits[table.replace(".int8", ".scale")].dims)[1] == 1
    # enough records for the limit asked: static is judged as before
    assert (
        _export(runs["bert"], tmp_path / "s", data, quantize="int8", max_drop=25)["quantization"][
            "recipe"
        ]
        == "static"
    )


def test_causal_int8_skips_static_scales(tiny_runs, tmp_path):
    assert [r.name for r in recipes_for("int8", causal=False)][0] == "static"
    assert "static" not in [r.name for r in recipes_for("int8", causal=True)]
    runs, data = tiny_runs
    m = _export(
        runs["llama"], tmp_path / "int8", data, quantize="int8", max_drop=100, graph="trace"
    )
    assert m["quantization"]["recipe"] == "weight-only"
    assert "calibration" not in m["quantization"]


def _strings(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


def test_guard_refuses_force_does_not_bypass_it_allow_drop_does(
    tiny_runs, tmp_path, every_loss_counts
):
    runs, data = tiny_runs
    out = tmp_path / "int8"
    out.mkdir()
    (out / "old").write_text("kept")
    # a max drop below any possible loss makes every recipe fail the guard; --force
    # (replace --out) does not let it pass, and the old folder survives the refusal
    with pytest.raises(ValueError, match="int8 loses .*--allow-accuracy-drop"):
        _export(runs["bert"], out, data, quantize="int8", max_drop=-100, force=True)
    assert [p.name for p in out.iterdir()] == ["old"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".int8")]
    m = _export(
        runs["bert"],
        out,
        data,
        quantize="int8",
        max_drop=-100,
        force=True,
        allow_accuracy_drop=True,
    )
    assert m["model"] == "model.int8.onnx"
    guard = m["quantization"]["guard"]["bert"]
    assert guard["data"] == {
        "file": data.name,
        "sha256": sha256_file(data),
        "n": len(read_records(data)),
    }
    assert {"fp32_accuracy", "quantized_accuracy", "lost", "gained", "p"} <= guard.keys()
    n = guard["data"]["n"]
    assert guard["quantized_accuracy"] - guard["fp32_accuracy"] == pytest.approx(
        (guard["gained"] - guard["lost"]) / n
    )
    # nothing of the exporting machine's file system in the shipped manifest
    manifest = json.loads((out / "ptedge.json").read_text())
    machine = {str(tmp_path), str(data.parent), str(runs["bert"])}
    assert not [s for s in _strings(manifest) if any(p in s for p in machine)]


def test_cli_force_and_allow_accuracy_drop_are_separate(tiny_runs, tmp_path, every_loss_counts):
    from click.testing import CliRunner

    from ptedge.cli import main

    runs, data = tiny_runs
    out = tmp_path / "b"
    base = ["export", str(runs["bert"]), "--out", str(out), "--eval", str(data)]
    base += ["--quantize", "int8", "--max-drop", "-100"]
    res = CliRunner().invoke(main, [*base, "--force"])
    assert res.exit_code != 0 and "--allow-accuracy-drop" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, [*base, "--allow-accuracy-drop"])
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert "guard      bert: fp32 " in info and f"records of {data.name}, " in info
    assert " lost, " in info and " gained, p " in info
    res = CliRunner().invoke(main, [*base, "--allow-accuracy-drop"])
    assert res.exit_code != 0 and "--force" in res.output  # out is not empty now
    shutil.rmtree(out)
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "--allow-accuracy-drop" in help_text and "int4" in help_text
