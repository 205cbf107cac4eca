"""Export: fused ONNX bundles reproduce the PyTorch model for every tiny backbone
family and head, int8 is guarded, generation bundles decode like PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import write_jsonl  # noqa: E402

from ptedge.data import read_records  # noqa: E402
from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.export.parity import PARITY_ATOL  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.train import Job, TrainArgs, predict_ids, train  # noqa: E402

VERB = {"0": "terrible", "1": "great"}
CASES = {
    "gpt2-verbalizer": ("gpt2", "[P:2] {sentence} [P:2] It was [MASK]", "lm", VERB, "slot"),
    "llama-open-vocab": ("llama", "[P:2] {sentence} [P] [MASK]", "lm", None, "slot"),
    "bert-mlm-verbalizer": ("bert-mlm", "[P] {sentence} [P:2] it was [MASK] .", "lm", VERB, "slot"),
    "bert-linear-slot": ("bert", "[P:2] {sentence} [P] [MASK]", "linear", None, "slot"),
    "bert-linear-mean": ("bert", "[P:2] {sentence} [P] [MASK]", "linear", None, "mean"),
}


def _open_vocab_file(tmp_path):
    recs = [
        {"sentence": "the movie was", "label": "great"},
        {"sentence": "a terrible boring", "label": "film"},
    ] * 4
    return write_jsonl(tmp_path / "open.jsonl", recs)


@pytest.mark.parametrize("case", list(CASES))
def test_bundle_matches_pytorch(case, tiny, sentiment_file, tmp_path):
    kind, template, head, verb, pool = CASES[case]
    data = _open_vocab_file(tmp_path) if head == "lm" and verb is None else sentiment_file
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train(
        TrainArgs(
            model=str(tiny(kind)),
            train=str(data),
            template=template,
            head=head,
            verbalizer=verb,
            pool=pool,
            steps=6,
            batch_size=4,
            out=str(run),
        ),
        progress=False,
    )
    manifest = export(ExportArgs(runs=[str(run)], out=str(bundle)))
    assert manifest["parity"]["run"]["max_abs_diff"] <= PARITY_ATOL
    assert manifest["parity"]["run"]["labels_equal"] == 1.0

    from ptedge.model import load_run

    records = read_records(data)
    torch_ids = predict_ids(Job(*load_run(run)[:4]), list(records))
    scores, _ = Predictor(bundle).scores(list(records), batch_size=3)
    assert scores.argmax(-1).tolist() == torch_ids
    on_disk = json.loads((bundle / "ptedge.json").read_text())
    assert set(on_disk["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}


def _tiny_linear_run(tiny, data, run) -> None:
    """A few steps of a linear-head run on the tiny BERT: enough to export."""
    train(
        TrainArgs(
            model=str(tiny("bert")),
            train=str(data),
            head="linear",
            template="[P:2] {sentence} [MASK]",
            steps=4,
            batch_size=4,
            out=str(run),
        ),
        progress=False,
    )


def test_int8_guard_refuses_then_force_writes(tiny, sentiment_file, tmp_path):
    run = tmp_path / "run"
    _tiny_linear_run(tiny, sentiment_file, run)
    out = tmp_path / "int8"
    # a max drop below any possible loss forces a refusal
    with pytest.raises(ValueError, match="int8 loses"):
        export(ExportArgs(runs=[str(run)], out=str(out), quantize="int8", max_drop=-100))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".int8")]
    m = export(
        ExportArgs(runs=[str(run)], out=str(out), quantize="int8", max_drop=-100, force=True)
    )
    assert m["model"] == "model.int8.onnx"
    guard = m["quantization"]["guard"]["run"]
    assert {"fp32_accuracy", "int8_accuracy", "n"} <= guard.keys()
    assert "/heads" in " ".join(m["quantization"]["excluded_nodes"])


def test_int8_embedding_is_per_row(tiny, sentiment_file, tmp_path):
    import onnx

    run, out = tmp_path / "run", tmp_path / "int8"
    _tiny_linear_run(tiny, sentiment_file, run)
    export(ExportArgs(runs=[str(run)], out=str(out), quantize="int8", max_drop=100))
    model = onnx.load(str(out / "model.int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    table = [n for n in inits if n.endswith(".int8")]
    assert len(table) == 1
    rows = inits[table[0]].dims[0]
    scale = inits[table[0].replace(".int8", ".scale")]
    assert list(scale.dims) == [rows, 1]  # one scale per row, prompt rows included


def test_int8_fuses_encoder_attention_and_keeps_labels(tiny, sentiment_file, tmp_path):
    import onnx

    run = tmp_path / "run"
    _tiny_linear_run(tiny, sentiment_file, run)
    export(ExportArgs(runs=[str(run)], out=str(tmp_path / "fp32")))
    m = export(
        ExportArgs(runs=[str(run)], out=str(tmp_path / "int8"), quantize="int8", max_drop=100)
    )
    q = m["quantization"]
    assert q["recipe"] == "all"
    assert q["fused_ops"]["Attention"] == 2  # the tiny BERT's two layers
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.int8.onnx")).graph.node}
    assert {"QAttention", "SkipLayerNormalization"} <= ops
    assert (tmp_path / "int8" / "model.int8.onnx.data").is_file()
    records = list(read_records(sentiment_file))
    a, _ = Predictor(tmp_path / "fp32").scores(records)
    b, _ = Predictor(tmp_path / "int8").scores(records)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_fusion_only_for_bert_family_encoders(tiny):
    from ptedge.export.fusion import encoder_shape

    assert encoder_shape(tiny("bert")) == {"num_heads": 2, "hidden_size": 32}
    assert encoder_shape(tiny("llama")) is None
    assert encoder_shape(tiny("gpt2")) is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_bundle_decodes_like_pytorch(kind, tiny, tmp_path):
    recs = [
        {"sub_label": "france", "obj_label": "paris"},
        {"sub_label": "italy", "obj_label": "rome"},
    ] * 3
    data = write_jsonl(tmp_path / "gen.jsonl", recs)
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train(
        TrainArgs(
            model=str(tiny(kind)),
            train=str(data),
            label_field="obj_label",
            template="[P:2] {sub_label} [P] [MASK]",
            head="generate",
            steps=6,
            batch_size=3,
            out=str(run),
        ),
        progress=False,
    )
    m = export(ExportArgs(runs=[str(run)], out=str(bundle)))
    assert m["parity"]["run"]["greedy_tokens_equal"] == 1.0
    assert m["tasks"]["run"]["kind"] == "generate"

    from ptedge.model import load_run

    job = Job(*load_run(run)[:4])
    p = Predictor(bundle)
    got = p.generate(recs, max_new_tokens=6)
    ref = job.generate(recs, 6)
    assert [g["text"] for g in got] == [r.strip() for r in ref]
    sampled = p.generate(recs, max_new_tokens=4, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    again = p.generate(recs, max_new_tokens=4, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert sampled == again  # seeded sampling is reproducible
    assert p.evaluate(list(read_records(data))) == {**job_eval(job, data), "skipped": 0}
    assert p.predict(recs[:1])[0].keys() >= {"text", "tokens"}


def job_eval(job, data):
    from ptedge.train import evaluate

    return evaluate(job, read_records(data))


def test_choose_top_p_keeps_the_nucleus():
    from ptedge.decoding import choose

    logits = np.log(np.array([[0.6, 0.3, 0.1]]))
    rng = np.random.default_rng(0)
    picks = {int(choose(logits, rng, temperature=1.0, top_p=0.5)[0]) for _ in range(50)}
    assert picks == {0}
    picks = {int(choose(logits, rng, temperature=1.0, top_k=2)[0]) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("recipe,level", [("weight-only", 4), ("weight-only-float", 1)])
def test_weight_only_recipe_keeps_heads_float_and_scores_close(
    tiny, sentiment_file, tmp_path, recipe, level
):
    import onnx
    import onnxruntime as ort

    from ptedge.export.quantize import quantize_int8

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    _tiny_linear_run(tiny, sentiment_file, run)
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    out = tmp_path / "w8.onnx"
    info = quantize_int8(bundle / "model.onnx", out, recipe)
    nbits = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and info["embedding"] is None
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {level}
    assert all(n.startswith("/heads") for n in info["excluded_nodes"])
    feeds = Predictor(bundle)
    recs = list(read_records(sentiment_file))
    ref, _ = feeds.scores(recs)
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from ptedge.template import encode

    spec = feeds.tasks["run"]
    enc = encode(spec["template"], feeds.tokenizer, recs)
    names = {i.name for i in s.get_inputs()}
    got = s.run(
        [spec["output"]],
        {
            k: v
            for k, v in {
                "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask,
                "slot": enc.slot,
            }.items()
            if k in names
        },
    )[0]
    assert np.abs(got - ref).max() < 0.05


def test_fp16_bundle_has_half_weights_and_fp32_labels(tiny, sentiment_file, tmp_path):
    import onnx

    run = tmp_path / "run"
    _tiny_linear_run(tiny, sentiment_file, run)
    fp32 = export(ExportArgs(runs=[str(run)], out=str(tmp_path / "fp32")))
    m = export(ExportArgs(runs=[str(run)], out=str(tmp_path / "fp16"), dtype="fp16"))
    assert m["model"] == "model.fp16.onnx" and m["dtype"] == "fp16"
    assert fp32["dtype"] == "fp32"
    model = onnx.load(str(tmp_path / "fp16" / "model.fp16.onnx"))
    types = {i.data_type for i in model.graph.initializer if len(i.dims) > 1}
    assert types == {onnx.TensorProto.FLOAT16}  # every weight matrix is half precision
    recs = list(read_records(sentiment_file))
    a, _ = Predictor(tmp_path / "fp32").scores(recs)
    b, _ = Predictor(tmp_path / "fp16").scores(recs)
    assert b.dtype == np.float32  # outputs keep their fp32 type: clients are unchanged
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert np.abs(a - b).max() <= m["parity"]["run"]["max_abs_diff"] + 0.05


def test_fp16_and_int8_exclude_each_other(tiny, sentiment_file, tmp_path):
    run = tmp_path / "run"
    _tiny_linear_run(tiny, sentiment_file, run)
    with pytest.raises(ValueError, match="exclude each other"):
        export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), quantize="int8", dtype="fp16"))
    assert not (tmp_path / "b").exists()


def test_fp16_generation_bundle_decodes(tiny, tmp_path):
    recs = [
        {"sub_label": "france", "obj_label": "paris"},
        {"sub_label": "italy", "obj_label": "rome"},
    ]
    data = write_jsonl(tmp_path / "gen.jsonl", recs * 3)
    run = tmp_path / "run"
    train(
        TrainArgs(
            model=str(tiny("llama")),
            train=str(data),
            label_field="obj_label",
            template="[P:2] {sub_label} [MASK]",
            head="generate",
            steps=4,
            batch_size=3,
            out=str(run),
        ),
        progress=False,
    )
    m = export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), dtype="fp16"))
    parity = m["parity"]["run"]
    assert parity["next_token_max_abs_diff"] <= 1e-2 * 50  # within the fp16 tolerance
    got = Predictor(tmp_path / "b").generate(recs, max_new_tokens=4)
    assert len(got) == 2 and all(isinstance(g["text"], str) for g in got)
