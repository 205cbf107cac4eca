"""Export: fused ONNX bundles reproduce the PyTorch model for every tiny backbone
family and head, fp16 is checked, generation bundles decode like PyTorch (int8/int4:
test_quantize.py)."""

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
    "bert-linear-text": ("bert", "[P:2] {sentence} [P] [MASK]", "linear", None, "text"),
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


def test_fp32_parity_tolerance_scales_with_large_scores():
    from ptedge.export.parity import PARITY_RTOL, fp32_tolerance

    assert fp32_tolerance(np.array([[0.5, -3.0]])) == PARITY_ATOL
    assert fp32_tolerance(np.array([[40.0, -3.0]])) == pytest.approx(40.0 * PARITY_RTOL)


def test_a_task_whose_dev_labels_it_cannot_score_is_left_uncalibrated(tiny, tmp_path):
    """LAMA's P1376 has 87 dev facts and none whose object is one SmolLM2 token: the
    export must not fail on it, and says the task is uncalibrated."""
    data = _open_vocab_file(tmp_path)
    run = tmp_path / "run"
    train(
        TrainArgs(model=str(tiny("llama")), train=str(data), template="[P:2] {sentence} [MASK]",
                  head="lm", steps=2, batch_size=4, dev="none", out=str(run)),
        progress=False,
    )  # fmt: skip
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "a", "label": "two words"}] * 3)
    manifest = export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), eval_file=str(dev)))
    assert manifest["tasks"]["run"]["calibration"] is None
    assert Predictor(tmp_path / "b").predict([{"sentence": "the movie was"}])[0]["label"]
