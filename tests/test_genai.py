"""Causal LMs through onnxruntime-genai's builder: fused task graphs and decoders, int4,
shared-cache decoding, and ``--format genai`` folders that onnxruntime-genai loads as they
are. Tiny random Llama backbones; the builder runs in its own environment (made on first
use, see ``ptedge.export.builder``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import write_jsonl  # noqa: E402

from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.export.genai import prompt_text, pseudo_token, write_tokenizer  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.template import compile_template, encode, load_tokenizer  # noqa: E402
from ptedge.train import TrainArgs, train  # noqa: E402

FACTS = [
    {"sub_label": "france", "obj_label": "paris"},
    {"sub_label": "italy", "obj_label": "rome"},
    {"sub_label": "the official language", "obj_label": "english"},
] * 3


@pytest.fixture(scope="module")
def gen_run(tiny, tmp_path_factory):
    """A generation run on the tiny Llama (a few steps: plumbing, not quality)."""
    root = tmp_path_factory.mktemp("genai")
    data = write_jsonl(root / "facts.jsonl", FACTS)
    run = root / "run"
    train(
        TrainArgs(
            model=str(tiny("llama")),
            train=str(data),
            label_field="obj_label",
            template="[P:2] {sub_label} [P:2] [MASK]",
            head="generate",
            steps=6,
            batch_size=3,
            out=str(run),
        ),
        progress=False,
    )
    return run


@pytest.fixture(scope="module")
def genai_folder(gen_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder") / "p"
    export(ExportArgs(runs=[str(gen_run)], out=str(out), format="genai"))
    return out


@pytest.mark.parametrize(
    "template",
    [
        "[P:2] {sub_label} [P:2] [MASK]",
        "Q: [P] {sub_label}\nA: [P:2] [MASK]",
        "the capital of [P] {sub_label} is [MASK]",
        "[P:3]{sub_label} , [P] [MASK]",
    ],
)
def test_prompt_text_tokenizes_like_the_template(template, tiny, tmp_path):
    """The genai prompt text, with the pseudo tokens added to the tokenizer, gives the
    ids ptedge's template encoding gives, whitespace rules included."""
    folder = tiny("llama")
    base = load_tokenizer(folder)
    V = base.get_vocab_size(with_added_tokens=True)
    compiled = compile_template(template, base, causal=True, mask_id=None, pad_id=0, pseudo_base=V)
    write_tokenizer(folder / "tokenizer.json", tmp_path / "tok.json", V, compiled["pseudo_count"])
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.token_to_id(pseudo_token(0)) == V
    prompt = prompt_text(template)
    for rec in FACTS[:3]:
        want = encode(compiled, base, [rec]).input_ids[0].tolist()
        assert tok.encode(prompt.format(**rec), add_special_tokens=False).ids == want


def test_genai_folder_generates_with_onnxruntime_genai_like_predictor(genai_folder):
    og = pytest.importorskip("onnxruntime_genai")
    manifest = json.loads((genai_folder / "ptedge.json").read_text())
    assert manifest["genai"]["check"]["greedy_tokens_equal"] == 1.0
    assert manifest["parity"]["run"]["greedy_tokens_equal"] == 1.0
    prompt = manifest["genai"]["prompt"]
    assert prompt == "<|ptedge:0|><|ptedge:1|> {sub_label}<|ptedge:2|><|ptedge:3|>"
    config = json.loads((genai_folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == manifest["model"]
    assert config["model"]["vocab_size"] == manifest["backbone"]["vocab_size"]

    model = og.Model(str(genai_folder))
    tok = og.Tokenizer(model)
    ours = Predictor(genai_folder).generate(FACTS[:3], max_new_tokens=6)
    for rec, mine in zip(FACTS[:3], ours, strict=True):
        ids = tok.encode(prompt.format(**rec))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 6)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        new = [int(t) for t in gen.get_sequence(0)[len(ids) :]]
        eos = manifest["tasks"]["run"]["eos_id"]
        assert (new[: new.index(eos)] if eos in new else new) == mine["tokens"]


def test_shared_cache_decoder_batches_rows_of_any_length(genai_folder):
    """Ragged rows in one batch decode as each row does alone (right-padded in the cache)."""
    p = Predictor(genai_folder)
    recs = [{"sub_label": "france"}, {"sub_label": "the official language of italy is"}]
    alone = [p.generate([r], max_new_tokens=5)[0]["tokens"] for r in recs]
    together = [g["tokens"] for g in p.generate(recs, max_new_tokens=5)]
    assert together == alone
    onnx_nodes = manifest_nodes(genai_folder)
    assert onnx_nodes["GroupQueryAttention"] == 2  # one fused attention per layer


def manifest_nodes(folder) -> dict[str, int]:
    import collections

    import onnx

    m = json.loads((folder / "ptedge.json").read_text())
    graph = onnx.load(str(folder / m["model"]), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def test_int4_decoder_is_guarded_and_genai_loadable(gen_run, tmp_path, every_loss_counts):
    out = tmp_path / "int4"
    with pytest.raises(ValueError, match="int4 loses"):
        export(
            ExportArgs(
                runs=[str(gen_run)], out=str(out), quantize="int4", format="genai", max_drop=-100
            )
        )
    assert not out.exists()
    m = export(
        ExportArgs(
            runs=[str(gen_run)],
            out=str(out),
            quantize="int4",
            format="genai",
            max_drop=-100,
            allow_accuracy_drop=True,
        )
    )
    assert m["model"] == "model.int4.onnx"
    assert m["quantization"]["guard"]["run"].keys() >= {"fp32_accuracy", "quantized_accuracy"}
    assert m["genai"]["check"]["greedy_tokens_equal"] == 1.0  # genai == ptedge on int4 too
    ops = manifest_nodes(out)
    assert ops["MatMulNBits"] > 0 and "MatMul" not in ops


def test_builder_task_graph_is_fused_and_keeps_heads_float(tiny, sentiment_file, tmp_path):
    run = tmp_path / "run"
    train(
        TrainArgs(
            model=str(tiny("llama")),
            train=str(sentiment_file),
            template="[P:2] {sentence} [P:2] It was [MASK]",
            verbalizer={"0": "terrible", "1": "great"},
            steps=4,
            batch_size=4,
            out=str(run),
        ),
        progress=False,
    )
    m = export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), quantize="int8", max_drop=100))
    assert m["parity"]["run"]["labels_equal"] == 1.0
    ops = manifest_nodes(tmp_path / "b")
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] > 0
    # int8-token: backbone projections are integer MatMuls; the label head stays float
    assert m["quantization"]["recipe"] == "int8-token"
    assert m["quantization"]["calibration"]["run"]["n"] > 0
    assert ops["MatMul"] == 1 and ops["MatMulIntegerToFloat"] == 2 * 5
    p = Predictor(tmp_path / "b")
    recs = [{"sentence": "the movie was great"}, {"sentence": "a dull, long and tired film"}]
    scores, _ = p.scores(recs)
    assert scores.shape == (2, 2) and np.isfinite(scores).all()
    alone, _ = p.scores(recs[:1])  # per-token scales: a record's scores ignore its batch
    np.testing.assert_allclose(alone[0], scores[0], rtol=1e-5, atol=1e-5)


def test_format_genai_needs_a_generation_run(tiny, sentiment_file, tmp_path):
    run = tmp_path / "run"
    train(
        TrainArgs(
            model=str(tiny("gpt2")),
            train=str(sentiment_file),
            template="[P:2] {sentence} [MASK]",
            verbalizer={"0": "terrible", "1": "great"},
            steps=2,
            batch_size=4,
            out=str(run),
        ),
        progress=False,
    )
    with pytest.raises(ValueError, match="--format genai needs"):
        export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b"), format="genai"))


def test_generation_runtime_stays_torch_free(genai_folder):
    """Predictor.generate on a builder decoder (IO binding, shared cache) loads no torch."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from ptedge.runtime import Predictor\n"
        f"out = Predictor({str(genai_folder)!r}).generate([{{'sub_label': 'france'}}], "
        "max_new_tokens=3)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'tokens': out[0]['tokens']}))\n"
    )
    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["torch"] is False
    again = Predictor(genai_folder).generate([{"sub_label": "france"}], max_new_tokens=3)
    assert res["tokens"] == again[0]["tokens"]


def test_builder_decoder_converts_to_ort_format(gen_run, tmp_path):
    m = export(ExportArgs(runs=[str(gen_run)], out=str(tmp_path / "b"), format="ort"))
    assert m["ort"]["file"] == "model.ort"
    p = Predictor(tmp_path / "b", prefer_ort=True)
    want = Predictor(tmp_path / "b").generate(FACTS[:2], max_new_tokens=4)
    assert p.generate(FACTS[:2], max_new_tokens=4) == want
