"""Shared fixtures: tiny random backbones built in-process, and the shared real data.

Tiny backbones (GPT-2, Llama, BERT masked LM, BERT encoder) are saved once per test
session as ordinary transformers folders with a ``tokenizer.json`` trained on a few
sentences; they exercise code paths, never quality or speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "the movie was great and the actors were wonderful",
    "a terrible boring film with a bad plot",
    "good fun for the whole family",
    "the official language of france is french",
    "my card has not arrived yet",
    "positive negative great terrible good bad",
    "paris london rome berlin madrid italy german english italian",
] * 4


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and the test machine's 2 cores are shared."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _builder_builds_in_tmp(tmp_path_factory):
    """onnxruntime-genai builds of tiny backbones go to a session folder, not the user's
    cache (each session's tiny backbones are new folders; the builder environment itself
    is shared, see ptedge.export.builder)."""
    import os

    if "PTEDGE_GENAI_BUILDS" in os.environ:
        yield
        return
    os.environ["PTEDGE_GENAI_BUILDS"] = str(tmp_path_factory.mktemp("genai-builds"))
    yield
    del os.environ["PTEDGE_GENAI_BUILDS"]


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def _wordpiece_tokenizer():
    """A WordPiece tokenizer whose vocabulary is built deterministically from CORPUS
    (the trainer's ties between equally frequent pieces vary between processes)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in CORPUS for w in line.split()} | {".", ",", "?", "!"})
    chars = sorted({c for w in words for c in w})
    pieces = specials + chars + [f"##{c}" for c in chars] + [w for w in words if len(w) > 1]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece()
    return tok, {
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }


def _bytelevel_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def build_tiny(kind: str, folder: Path) -> Path:
    """Save a tiny random backbone of ``kind`` (gpt2, llama, bert-mlm, bert) in ``folder``."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if kind.startswith("bert"):
        tok, specials = _wordpiece_tokenizer()
        config = tf.BertConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        model = tf.BertForMaskedLM(config) if kind == "bert-mlm" else tf.BertModel(config)
    else:
        tok, specials = _bytelevel_tokenizer()
        eos = tok.token_to_id("<|endoftext|>")
        if kind == "gpt2":
            config = tf.GPT2Config(
                vocab_size=tok.get_vocab_size(),
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=128,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            model = tf.GPT2LMHeadModel(config)
        else:
            config = tf.LlamaConfig(
                vocab_size=tok.get_vocab_size(),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=128,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=eos,
                tie_word_embeddings=True,
            )
            model = tf.LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Factory: tiny(kind) -> folder of a tiny random backbone, built once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny(kind, root / kind)
        return cache[kind]

    return get


@pytest.fixture
def every_loss_counts(monkeypatch):
    """The int8/int4 guard without its allowance for chance: with a negative --max-drop,
    every recipe fails it."""
    import ptedge.export.guard

    monkeypatch.setattr(ptedge.export.guard, "SIGNIFICANCE", 1.0)


def splitting_rule(scores, kind: str) -> dict:
    """A rejection rule of ``kind`` ("distance" or "combined", docs/bundle-format.md §7)
    for a bundle's raw scores (N, L), its threshold halfway between the two middle records'
    ``in_scope`` values, so that it rejects about half of them: for client parity tests."""
    import numpy as np

    from ptedge import calibration

    model = calibration.distance_model(scores, np.arange(len(scores)) % scores.shape[1])
    rule = {"score": kind, "distance": model}
    if kind == "combined":
        log_top = np.log(calibration.probabilities(scores, 1.7).max(-1))
        far = -calibration.distances(scores, model)
        rule |= {"temperature": 1.7, "standardize": {
            "log_probability": [float(log_top.mean()), float(log_top.std())],
            "distance": [float(far.mean()), float(far.std())],
        }}  # fmt: skip
    conf = sorted(calibration.in_scope(scores, rule))
    mid = len(conf) // 2
    return rule | {"threshold": (conf[mid - 1] + conf[mid]) / 2}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def sentiment_file(tmp_path) -> Path:
    """A small binary sentiment data set in the SST-2 shape (sentence, label)."""
    good = ["good fun for the whole family", "the movie was great", "wonderful actors"]
    bad = ["a terrible boring film", "bad plot", "the film was terrible"]
    recs = [{"sentence": s, "label": "1"} for s in good] + [
        {"sentence": s, "label": "0"} for s in bad
    ]
    return write_jsonl(tmp_path / "sent.jsonl", recs * 3)


# -- a real bundle shared by the tests that need one (slow: built once per session) ---------

B77_TRAIN_ARGS = [
    "--template",
    "[P:3] {text} [P:3] [MASK]",
    "--label-field",
    "category",
    "--head",
    "linear",
    "--steps",
    "150",
    "--batch-size",
    "32",
]
CLI_TIMEOUT = 1800  # s, one `ptedge train` or `ptedge export` on a busy 2-core machine


def run_cli(*args: str) -> None:
    """``ptedge ARGS`` in a fresh interpreter (its memory is freed when it ends), on one
    thread unless OMP_NUM_THREADS says otherwise: 2-thread PyTorch crawls on a shared,
    oversubscribed 2-core machine (see tools/_bench_common.busy_note)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from ptedge.cli import main; main()", *args]
    env = {"OMP_NUM_THREADS": "1"} | dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)
    if proc.returncode != 0:
        pytest.fail(f"ptedge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def banking77_run(tmp_path_factory) -> Path:
    """A MiniLM BANKING77 run folder trained by ``ptedge train`` (150 steps x 32), once per
    session; skips without ../shared/data or the minilm-l6 backbone. Read-only."""
    train_csv = shared_data("banking77", "train.csv")
    pytest.importorskip("torch")
    from ptedge.backbones import fetch

    try:
        model = fetch("minilm-l6", quiet=True)
    except RuntimeError as e:
        pytest.skip(f"minilm-l6 backbone unavailable: {e}")
    run = tmp_path_factory.mktemp("banking77") / "banking77"
    run_cli(
        "train",
        "--model",
        str(model),
        "--train",
        str(train_csv),
        *B77_TRAIN_ARGS,
        "--out",
        str(run),
    )
    return run


@pytest.fixture(scope="session")
def banking77_int8_bundle(banking77_run) -> Path:
    """The BANKING77 run exported by ``ptedge export --quantize int8`` (default settings),
    once per session. Read-only: copy it (``shutil.copytree``) to change anything."""
    bundle = banking77_run.parent / "bundle-int8"
    run_cli("export", str(banking77_run), "--out", str(bundle), "--quantize", "int8")
    return bundle


@pytest.fixture(scope="session")
def banking77_fp32_bundle(banking77_run) -> Path:
    """The same run exported by ``ptedge export`` without quantization. Read-only."""
    bundle = banking77_run.parent / "bundle-fp32"
    run_cli("export", str(banking77_run), "--out", str(bundle))
    return bundle


@pytest.fixture
def intents(tmp_path):
    """300 records, 3 intents of unequal size."""
    texts = {
        "card": "my card has not arrived yet",
        "film": "the movie was great",
        "lang": "the official language of france is french",
    }
    recs = [
        {"text": f"{texts[lab]} {i}", "intent": lab}
        for lab, n in (("card", 150), ("film", 100), ("lang", 50))
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "intents.jsonl", recs)
