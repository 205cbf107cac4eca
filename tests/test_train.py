"""Tests for ptedge.train: run folders, validation before writing, determinism, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import write_jsonl  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ptedge.config import RunConfig  # noqa: E402
from ptedge.data import DataError, read_records  # noqa: E402
from ptedge.model import ENCODER_FILE, HEAD_FILE, load_run  # noqa: E402
from ptedge.template import TemplateError  # noqa: E402
from ptedge.train import CURVE, METRICS, TIMING, Job, TrainArgs, evaluate, train  # noqa: E402

LM_TEMPLATE = "[P:2] {sentence} [P:2] It was [MASK]"
MLM_TEMPLATE = "[P:2] {sentence} [P:2] it was [MASK] ."
FAMILIES = {
    # kind: (template, verbalizer, head written in ptedge.json)
    "gpt2": (LM_TEMPLATE, {"0": "terrible", "1": "great"}, "lm"),
    "llama": (LM_TEMPLATE, {"0": "terrible", "1": "great"}, "lm"),
    "bert-mlm": (MLM_TEMPLATE, {"0": "bad", "1": "great"}, "lm"),
    "bert": (MLM_TEMPLATE, None, "linear"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def args_for(tiny, kind: str, train_file: Path, out: Path, **kw) -> TrainArgs:
    template, verbalizer, _ = FAMILIES[kind]
    kw.setdefault("template", template)
    kw.setdefault("verbalizer", verbalizer)
    kw.setdefault("steps", 4)
    kw.setdefault("batch_size", 4)
    return TrainArgs(model=str(tiny(kind)), train=str(train_file), out=str(out), **kw)


def metrics_rows(out: Path, name: str = METRICS) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line]


def weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(out / ENCODER_FILE))
    if (out / HEAD_FILE).exists():
        tensors |= {f"head.{k}": v for k, v in load_file(str(out / HEAD_FILE)).items()}
    return tensors


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_train_writes_a_run_folder(tiny, sentiment_file, tmp_path, kind):
    out = tmp_path / "run"
    args = args_for(
        tiny,
        kind,
        sentiment_file,
        out,
        dev=str(sentiment_file),
        steps=6,
        log_every=1,
        eval_every=3,
    )
    cfg = train(args, progress=False)
    _, _, head = FAMILIES[kind]

    files = {p.name for p in out.iterdir()}
    assert {"ptedge.json", ENCODER_FILE, METRICS, CURVE} <= files
    assert (HEAD_FILE in files) == (head == "linear")
    assert (out / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = RunConfig.load(out)
    assert saved == cfg
    assert saved.head == head and saved.steps == 6 and saved.n_pseudo == 4
    assert saved.causal == (kind in ("gpt2", "llama"))
    assert saved.labels == ["0", "1"]
    assert saved.model == str(Path(tiny(kind)).resolve())
    assert len(saved.model_sha256) == 64
    assert {"ptedge", "torch", "transformers"} <= set(saved.versions)
    assert saved.best["step"] in (3, 6) and 0.0 <= saved.best["dev_accuracy"] <= 1.0
    assert saved.best["dev_n"] == 18 and saved.best["dev_skipped"] == 0

    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "loss", "lr"} <= set(r) and "samples_per_s" not in r
        assert r["loss"] > 0 and r["lr"] >= 0
    timing = metrics_rows(out, TIMING)  # wall-clock figures, kept apart from what repeats
    assert [r["step"] for r in timing] == [1, 2, 3, 4, 5, 6]
    assert all(r["samples_per_s"] > 0 for r in timing)
    dev_rows = [r for r in rows if "dev_accuracy" in r]
    assert [r["step"] for r in dev_rows] == [3, 6]
    assert all({"dev_n", "dev_skipped"} <= set(r) for r in dev_rows)

    # the run loads back and scores the same records the same way
    cfg2, model, tok, compiled, _ = load_run(out)
    result = evaluate(Job(cfg2, model, tok, compiled), read_records(sentiment_file))
    assert result["n"] == 18 and result["skipped"] == 0
    assert result["accuracy"] == pytest.approx(saved.best["dev_accuracy"])


def test_metrics_default_logging(tiny, sentiment_file, tmp_path):
    """Every line has a step; loss lines carry lr and throughput; dev lines their metrics."""
    out = tmp_path / "run"
    train(
        args_for(tiny, "gpt2", sentiment_file, out, dev=str(sentiment_file), steps=12),
        progress=False,
    )
    rows = metrics_rows(out)
    assert all("step" in r for r in rows)
    loss_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in loss_rows] == [10, 12]  # log_every=10, and the last step
    assert all("lr" in r for r in loss_rows)
    assert [r["step"] for r in metrics_rows(out, TIMING)] == [10, 12]
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["step"] == 12 and "loss" in rows[-1] and "dev_accuracy" in rows[-1]


def test_linear_head_learns_tiny_sentiment(tiny, sentiment_file, tmp_path):
    """The tiny random BERT's slot state is dominated by position, so pool over tokens."""
    out = tmp_path / "run"
    args = args_for(
        tiny,
        "bert",
        sentiment_file,
        out,
        dev=str(sentiment_file),
        steps=80,
        batch_size=6,
        lr=3e-2,
        pool="mean",
        seed=3,
    )
    cfg = train(args, progress=False)
    assert cfg.best["dev_accuracy"] == 1.0
    assert cfg.pool == "mean"
    rows = metrics_rows(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    # the best prompt is what was saved
    cfg2, model, tok, compiled, _ = load_run(out)
    assert evaluate(Job(cfg2, model, tok, compiled), read_records(sentiment_file))["accuracy"] == 1


def test_head_lr_moves_only_the_head_faster(tiny, sentiment_file, tmp_path):
    """Same seed and lr, two head lrs: the encoder ends identical after one step (its own
    lr and gradient are unchanged), the head moves further with the larger head lr."""
    moved = {}
    for name, head_lr in (("same", 3e-3), ("fast", 0.3)):
        out = tmp_path / name
        cfg = train(
            args_for(
                tiny,
                "bert",
                sentiment_file,
                out,
                template="[P:2] {sentence} [MASK]",
                verbalizer=None,
                head="linear",
                steps=1,
                head_lr=head_lr,
                warmup=0,
            ),
            progress=False,
        )
        assert cfg.head_lr == head_lr
        moved[name] = {f: load_file(out / f) for f in (ENCODER_FILE, HEAD_FILE)}
    for k, v in moved["same"][ENCODER_FILE].items():
        assert torch.equal(v, moved["fast"][ENCODER_FILE][k])
    assert not torch.equal(moved["same"][HEAD_FILE]["weight"], moved["fast"][HEAD_FILE]["weight"])


def test_head_lr_needs_a_linear_head(tiny, sentiment_file, tmp_path):
    args = args_for(tiny, "gpt2", sentiment_file, tmp_path / "r", steps=1, head_lr=0.1)
    with pytest.raises(ValueError, match="--head-lr is for the linear head"):
        train(args, progress=False)


def test_epochs_set_the_step_count(tiny, sentiment_file, tmp_path):
    cfg = train(
        args_for(
            tiny, "bert", sentiment_file, tmp_path / "a", steps=None, epochs=1.0, batch_size=4
        ),
        progress=False,
    )
    assert cfg.steps == 5  # ceil(18 / 4)
    cfg = train(
        args_for(
            tiny, "bert", sentiment_file, tmp_path / "b", steps=None, epochs=0.5, batch_size=4
        ),
        progress=False,
    )
    assert cfg.steps == 3


def test_manual_baseline_with_zero_steps(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    cfg = train(
        args_for(
            tiny,
            "gpt2",
            sentiment_file,
            out,
            template="{sentence} It was [MASK]",
            steps=0,
            dev=str(sentiment_file),
        ),
        progress=False,
    )
    assert cfg.steps == 0 and cfg.n_pseudo == 0
    assert cfg.best["step"] == 0 and cfg.best["dev_n"] == 18
    assert (out / "ptedge.json").is_file() and (out / ENCODER_FILE).is_file()
    cfg2, model, tok, compiled, _ = load_run(out)
    result = evaluate(Job(cfg2, model, tok, compiled), read_records(sentiment_file))
    assert result["n"] == 18 and result["skipped"] == 0
    assert result["accuracy"] == pytest.approx(cfg.best["dev_accuracy"])


# -- validation before writing ------------------------------------------------------------


@pytest.mark.parametrize("steps", [3, None])
def test_no_pseudo_tokens_with_lm_head_and_steps(tiny, sentiment_file, tmp_path, steps):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"no \[P\] tokens.*--steps 0"):
        train(
            args_for(
                tiny, "gpt2", sentiment_file, out, template="{sentence} It was [MASK]", steps=steps
            ),
            progress=False,
        )
    assert not out.exists()


def test_no_pseudo_tokens_with_linear_head_trains_the_head(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    cfg = train(
        args_for(tiny, "bert", sentiment_file, out, template="{sentence} [MASK]", steps=3),
        progress=False,
    )
    assert cfg.n_pseudo == 0 and cfg.steps == 3
    assert (out / HEAD_FILE).is_file()


def test_steps_and_epochs_together(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--steps or --epochs"):
        train(args_for(tiny, "bert", sentiment_file, out, steps=3, epochs=1.0), progress=False)
    assert not out.exists()


def test_bad_template_fails_first(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TemplateError, match=r"\[P:x\]"):
        train(
            args_for(tiny, "bert", sentiment_file, out, template="[P:x] {sentence} [MASK]"),
            progress=False,
        )
    assert not out.exists()


def test_lm_head_on_backbone_without_one(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--head linear"):
        train(
            args_for(
                tiny, "bert", sentiment_file, out, head="lm", verbalizer={"0": "bad", "1": "great"}
            ),
            progress=False,
        )
    assert not out.exists()


def test_non_empty_out_needs_force(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        train(args_for(tiny, "bert", sentiment_file, out), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"

    train(args_for(tiny, "bert", sentiment_file, out, force=True), progress=False)
    assert not (out / "keep.txt").exists() and (out / "ptedge.json").is_file()


def test_empty_out_folder_is_fine(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    train(args_for(tiny, "bert", sentiment_file, out, steps=1), progress=False)
    assert (out / "ptedge.json").is_file()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dev_label_not_in_training_labels(tiny, sentiment_file, tmp_path, kind):
    dev = write_jsonl(
        tmp_path / "dev.jsonl",
        [
            {"sentence": "the movie was great", "label": "1"},
            {"sentence": "bad plot", "label": "0"},
            {"sentence": "so so", "label": "2"},
        ],
    )
    out = tmp_path / "run"
    with pytest.raises(DataError) as e:
        train(args_for(tiny, kind, sentiment_file, out, dev=str(dev)), progress=False)
    msg = str(e.value)
    assert f"{dev}:3:" in msg and "'2'" in msg
    assert "\n" not in msg
    assert not out.exists()


def test_dev_missing_field(tiny, sentiment_file, tmp_path):
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "x", "label": "1"}, {"text": "y"}])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"{dev}:2: missing field 'sentence'"):
        train(args_for(tiny, "bert", sentiment_file, out, dev=str(dev)), progress=False)
    assert not out.exists()


def test_missing_train_file(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="no such file"):
        train(args_for(tiny, "bert", tmp_path / "nope.jsonl", out), progress=False)
    assert not out.exists()


def test_verbalizer_word_not_one_token(tiny, sentiment_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TemplateError, match="'xyzzy'"):
        train(
            args_for(tiny, "gpt2", sentiment_file, out, verbalizer={"0": "xyzzy", "1": "great"}),
            progress=False,
        )
    assert not out.exists()


# -- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_same_seed_same_weights(tiny, sentiment_file, tmp_path, kind):
    def run(name: str, seed: int) -> dict:
        out = tmp_path / name
        train(args_for(tiny, kind, sentiment_file, out, steps=5, seed=seed), progress=False)
        return weights(out)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# -- open vocabulary ----------------------------------------------------------------------

FACTS = [
    {"sub": "the movie", "obj": "great"},
    {"sub": "the film", "obj": "terrible"},
    {"sub": "the capital", "obj": "paris"},  # " paris" is two tokens in the tiny BPE
    {"sub": "the language", "obj": "french"},
    {"sub": "the word", "obj": "xyzzy"},  # many tokens
    {"sub": "the country", "obj": "france"},
]


def test_open_vocabulary_skips_multi_token_labels(tiny, tmp_path):
    from ptedge.template import answer_ids, compile_template, load_tokenizer

    tok = load_tokenizer(tiny("gpt2"))
    c = compile_template("{sub} [P:2] is [MASK]", tok, causal=True, mask_id=None, pad_id=0)
    single = [i is not None for i in answer_ids(c, tok, [f["obj"] for f in FACTS], strict=False)]
    assert single == [True, True, False, True, False, True]

    data = write_jsonl(tmp_path / "facts.jsonl", FACTS * 2)
    out = tmp_path / "run"
    cfg = train(
        TrainArgs(
            model=str(tiny("gpt2")),
            train=str(data),
            dev=str(data),
            out=str(out),
            template="{sub} [P:2] is [MASK]",
            label_field="obj",
            steps=3,
            batch_size=4,
        ),
        progress=False,
    )
    assert cfg.head == "lm" and cfg.labels is None and cfg.verbalizer is None
    assert cfg.best["dev_n"] == 8 and cfg.best["dev_skipped"] == 4

    cfg2, model, tok, compiled, label_ids = load_run(out)
    assert label_ids is None
    result = evaluate(Job(cfg2, model, tok, compiled), read_records(data))
    assert result["n"] == 8 and result["skipped"] == 4
    assert 0.0 <= result["accuracy"] <= 1.0


def test_open_vocabulary_with_no_usable_record(tiny, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", [{"sub": "a", "obj": "xyzzy"}] * 3)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no usable training records"):
        train(
            TrainArgs(
                model=str(tiny("gpt2")),
                train=str(data),
                out=str(out),
                template="{sub} [P] is [MASK]",
                label_field="obj",
                steps=2,
            ),
            progress=False,
        )
    assert not out.exists()
