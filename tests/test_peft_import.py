"""Tests for ptedge.peft_import: a PEFT prompt adapter becomes a run with PEFT's labels.

Each test trains a real PEFT adapter for a few steps (P-tuning or prompt tuning), saves
it, imports it, and checks that ptedge in PyTorch (the imported run) and onnxruntime
(its exported bundle) give exactly the labels PEFT gives on the same records, with
PEFT's own model reloaded from the saved adapter as the reference.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import CORPUS, shared_data, write_jsonl  # noqa: E402

from ptedge.config import RunConfig  # noqa: E402
from ptedge.model import load_run  # noqa: E402
from ptedge.peft_import import PEFT_CONFIG_COPY, import_peft  # noqa: E402
from ptedge.train import Job, predict_ids  # noqa: E402

TEXTS = sorted(set(CORPUS)) + [
    "the card was great",
    "a bad film about france",
    "my card has arrived and it is good",
    "rome and madrid are wonderful",
    "the whole plot was boring",
]


def _topic(text: str) -> int:
    if "card" in text:
        return 1
    return 2 if any(w in text for w in ("paris", "france", "rome")) else 0


TARGETS = [_topic(t) for t in TEXTS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sharp_bert(tiny, tmp_path_factory) -> Path:
    """tiny("bert") with its weight matrices scaled by 10, so attention is sharp.

    The tiny random BERT's pooled first position hardly depends on the text (PEFT's logits
    vary by ~1e-4 across records, so every record gets one label); scaled, they vary by
    ~0.3 and the labels differ, which makes "the same labels as PEFT" a real check.
    """
    src = tiny("bert")
    model = transformers.BertModel.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "LayerNorm" not in name:
                p.mul_(10.0)
    out = tmp_path_factory.mktemp("sharp") / "bert"
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def _hf_tokenizer(model_dir: Path):
    """The tokenizer a PEFT user would call: HF's fast tokenizer on the same tokenizer.json."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )


def _peft_config(kind: str, task: str, n_virtual: int, hidden: int):
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=n_virtual, encoder_hidden_size=hidden
        )
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n_virtual)


def train_seq_cls_adapter(
    base_dir: Path,
    adapter_dir: Path,
    texts: list[str],
    targets: list[int],
    n_labels: int,
    *,
    kind: str = "p_tuning",
    n_virtual: int = 4,
    steps: int = 12,
    batch_size: int = 8,
    lr: float = 3e-2,
    centre: bool = False,
) -> None:
    """P-tune BertForSequenceClassification with PEFT for a few steps and save the adapter.

    ``centre``: then shift the classifier's bias so each label's mean logit over ``texts``
    is 0; a few steps on a tiny random model may otherwise leave one label winning
    everywhere, and these tests check agreement with PEFT, not learning.
    """
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        base_dir, num_labels=n_labels
    )
    pm = peft.get_peft_model(
        model, _peft_config(kind, "SEQ_CLS", n_virtual, model.config.hidden_size)
    )
    tok = _hf_tokenizer(base_dir)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    pm.train()
    for _ in range(steps):
        idx = rng.sample(range(len(texts)), min(batch_size, len(texts)))
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
        out = pm(**batch, labels=torch.tensor([targets[i] for i in idx]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    pm.eval()
    if centre:
        with torch.no_grad():
            batch = tok(texts, padding=True, return_tensors="pt")
            logits = pm(**batch).logits  # (N, L)
            pm.base_model.classifier.modules_to_save["default"].bias -= logits.mean(0)
    pm.save_pretrained(adapter_dir)


@torch.inference_mode()
def peft_seq_cls_logits(base_dir: Path, adapter_dir: Path, texts: list[str], n_labels: int):
    """PEFT's own logits (N, L): the base model reloaded, the saved adapter applied."""
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir, num_labels=n_labels)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = _hf_tokenizer(base_dir)
    out = []
    for i in range(0, len(texts), 16):
        batch = tok(texts[i : i + 16], padding=True, truncation=True, return_tensors="pt")
        out.append(model(**batch).logits)
    return torch.cat(out)


def ptedge_scores(run_dir: Path, records: list[dict]) -> tuple[list[int], torch.Tensor]:
    """(top-1 label index, scores) of the imported run in PyTorch (``ptedge eval``'s path)."""
    cfg, model, tok, compiled, _ = load_run(run_dir)
    job = Job(cfg, model, tok, compiled)
    with torch.inference_mode():
        scores = torch.cat(
            [model(*job.batch(records[i : i + 16])) for i in range(0, len(records), 16)]
        )
    return predict_ids(job, records, batch_size=16), scores


def bundle_predictions(run_dir: Path, bundle: Path, records: list[dict]) -> list[dict]:
    from ptedge.export import ExportArgs, export
    from ptedge.runtime import Predictor

    export(ExportArgs(runs=[str(run_dir)], out=str(bundle)))
    return Predictor(bundle).predict(records, batch_size=8)


def _records(texts, labels, field="sentence", label_field="label"):
    return [{field: t, label_field: lab} for t, lab in zip(texts, labels, strict=True)]


@pytest.mark.parametrize("kind", ["p_tuning", "prompt_tuning"])
def test_seq_cls_adapter_gives_peft_labels(sharp_bert, tmp_path, kind):
    base = sharp_bert
    n_labels = 3
    adapter = tmp_path / "adapter"
    train_seq_cls_adapter(base, adapter, TEXTS, TARGETS, n_labels, kind=kind, centre=True)
    names = ["film", "card", "place"]
    records = _records(TEXTS, [names[t] for t in TARGETS])
    data = write_jsonl(tmp_path / "data.jsonl", records)

    run = tmp_path / "run"
    cfg = import_peft(adapter, base, run, labels=names, data=data)
    assert (cfg.head, cfg.encoder, cfg.pool, cfg.layout) == ("linear", "none", "pooler", "peft")
    assert cfg.template == "[P:4] {sentence}" and cfg.n_pseudo == 4
    assert RunConfig.load(run).labels == names
    assert (run / PEFT_CONFIG_COPY).is_file()

    ref = peft_seq_cls_logits(base, adapter, TEXTS, n_labels)
    ref_labels = ref.argmax(-1).tolist()
    assert len(set(ref_labels)) > 1, "degenerate reference: every record gets one label"
    got, scores = ptedge_scores(run, records)
    assert got == ref_labels
    assert torch.allclose(scores, ref, atol=1e-4), float((scores - ref).abs().max())

    preds = bundle_predictions(run, tmp_path / "bundle", records)
    assert [p["label"] for p in preds] == [names[i] for i in ref_labels]
    # the bundle reports probabilities calibrated on the run's dev file (--data)
    manifest = json.loads((tmp_path / "bundle" / "ptedge.json").read_text())
    temperature = manifest["tasks"]["run"]["calibration"]["temperature"]
    probs = (ref / temperature).softmax(-1)
    for p, row in zip(preds, probs, strict=True):
        assert p["scores"] == pytest.approx(dict(zip(names, row.tolist(), strict=True)), abs=1e-4)


def test_virtual_tokens_go_before_cls(tiny, tmp_path):
    """PEFT's layout: P1..Pn [CLS] text [SEP]; position 0 is the first virtual token."""
    base = tiny("bert")
    adapter = tmp_path / "adapter"
    train_seq_cls_adapter(base, adapter, TEXTS[:4], [0, 1, 0, 1], 2, steps=1)
    run = tmp_path / "run"
    cfg = import_peft(adapter, base, run)
    assert cfg.labels == ["0", "1"]
    _, model, tok, compiled, _ = load_run(run)
    job = Job(cfg, model, tok, compiled)
    ids, mask, slot = job.batch([{"sentence": "the movie was great"}])
    hf = _hf_tokenizer(base)("the movie was great")["input_ids"]
    V = cfg.vocab_size
    assert ids[0].tolist() == [V, V + 1, V + 2, V + 3] + hf
    assert hf[0] == tok.token_to_id("[CLS]")
    assert slot.tolist() == [0] and mask.all()


def test_eval_cli_accepts_the_imported_run(tiny, tmp_path):
    from click.testing import CliRunner

    from ptedge.cli import main

    base = tiny("bert")
    adapter = tmp_path / "adapter"
    train_seq_cls_adapter(base, adapter, TEXTS[:6], [0, 1, 0, 1, 1, 0], 2, steps=2)
    data = write_jsonl(tmp_path / "d.jsonl", _records(TEXTS[:6], ["0", "1", "0", "1", "1", "0"]))
    run = tmp_path / "run"
    import_peft(adapter, base, run)
    res = CliRunner().invoke(main, ["eval", str(run), "--data", str(data)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    ref = peft_seq_cls_logits(base, adapter, TEXTS[:6], 2).argmax(-1).tolist()
    hits = sum(r == t for r, t in zip(ref, [0, 1, 0, 1, 1, 0], strict=True))
    assert out["n"] == 6 and out["accuracy"] == pytest.approx(hits / 6)


def test_causal_lm_adapter_gives_peft_next_token(tiny, tmp_path):
    """CAUSAL_LM: PEFT's logits at the last position = the run's open-vocabulary answer."""
    base = tiny("gpt2")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, _peft_config("p_tuning", "CAUSAL_LM", 3, 32))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(base / "tokenizer.json"), pad_token="<|endoftext|>"
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    pm.train()
    for step in range(6):
        texts = [TEXTS[(step * 4 + k) % len(TEXTS)] for k in range(4)]
        batch = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = pm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    texts = TEXTS[:8]
    ref_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), adapter
    ).eval()
    with torch.inference_mode():
        ref = [ref_model(**tok(t, return_tensors="pt")).logits[0, -1] for t in texts]
    assert len({int(r.argmax()) for r in ref}) > 1, "degenerate reference"
    ref_ids = [int(r.argmax()) for r in ref]

    records = _records(texts, ["x"] * len(texts))
    run = tmp_path / "run"
    cfg = import_peft(adapter, base, run, data=write_jsonl(tmp_path / "d.jsonl", records))
    assert (cfg.head, cfg.causal, cfg.labels) == ("lm", True, None)
    got, scores = ptedge_scores(run, records)
    assert got == ref_ids
    assert torch.allclose(scores, torch.stack(ref), atol=1e-4)
    preds = bundle_predictions(run, tmp_path / "bundle", records)
    assert [p["token_id"] for p in preds] == ref_ids


def test_refusals(tiny, tmp_path):
    base = tiny("bert")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(tmp_path / "nowhere", base, tmp_path / "run")

    prefix = tmp_path / "prefix"
    model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
    cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    peft.get_peft_model(model, cfg).save_pretrained(prefix)
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        import_peft(prefix, base, tmp_path / "run")
    assert not (tmp_path / "run").exists()

    adapter = tmp_path / "adapter"
    train_seq_cls_adapter(base, adapter, TEXTS[:4], [0, 1, 0, 1], 2, steps=1)
    with pytest.raises(ValueError, match="BERT-style"):
        import_peft(adapter, tiny("gpt2"), tmp_path / "run")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_peft(adapter, base, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    import_peft(adapter, base, busy, force=True)
    assert RunConfig.load(busy).layout == "peft"
    with pytest.raises(ValueError, match="labels: 3 given"):
        import_peft(adapter, base, tmp_path / "run2", labels=["a", "b", "c"])


@pytest.mark.slow
def test_minilm_banking77_adapter_gives_peft_labels(tmp_path):
    """Real MiniLM, 77 BANKING77 labels, 200 test sentences: PEFT = ptedge = bundle."""
    from ptedge.backbones import fetch

    data = shared_data("banking77")
    names = json.loads((data / "categories.json").read_text())
    with (data / "train.csv").open(newline="") as f:
        train = list(csv.DictReader(f))
    with (data / "test.csv").open(newline="") as f:
        test = random.Random(0).sample(list(csv.DictReader(f)), 200)
    base = fetch("minilm-l6", quiet=True)
    index = {n: i for i, n in enumerate(names)}
    train = random.Random(0).sample(train, 800)
    adapter = tmp_path / "adapter"
    train_seq_cls_adapter(
        base,
        adapter,
        [r["text"] for r in train],
        [index[r["category"]] for r in train],
        len(names),
        n_virtual=6,
        steps=40,
        batch_size=16,
        lr=5e-2,  # measured: ~34% test accuracy, 43 distinct labels, top-2 margins >= 1e-3
    )
    texts = [r["text"] for r in test]
    records = _records(texts, [r["category"] for r in test], "text", "category")
    run = tmp_path / "banking77"
    import_peft(
        adapter,
        base,
        run,
        field="text",
        label_field="category",
        labels=names,
        data=write_jsonl(tmp_path / "test200.jsonl", records),
    )
    ref = peft_seq_cls_logits(base, adapter, texts, len(names))
    ref_labels = ref.argmax(-1).tolist()
    assert len(set(ref_labels)) > 10, "degenerate reference: PEFT barely trained"
    got, scores = ptedge_scores(run, records)
    assert got == ref_labels
    assert float((scores - ref).abs().max()) < 1e-4
    preds = bundle_predictions(run, tmp_path / "bundle", records)
    assert [p["label"] for p in preds] == [names[i] for i in ref_labels]
