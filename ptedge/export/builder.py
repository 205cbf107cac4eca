"""onnxruntime-genai's model builder, run in a Python environment of its own.

onnxruntime-genai's builder (``python -m onnxruntime_genai.models.builder``) writes a
causal LM as one fused decoder graph: ``GroupQueryAttention`` with rotary embedding
inside, ``SkipSimplifiedLayerNormalization``, optionally ``MatMulNBits`` weights; 30
SmolLM2 layers take a few hundred nodes where our TorchScript export takes 7,381. It
needs transformers 5, while ``ptedge[train]`` pins transformers 4.57, so it runs as a
subprocess in a virtual environment made on first use from PyPI:

- where: ``$PTEDGE_GENAI_BUILDER`` (a folder), else ``~/.cache/ptedge/genai-builder-<version>``;
- what: ``BUILDER_REQUIREMENTS`` (torch's CPU build, transformers 5, onnxruntime-genai),
  installed with this interpreter's ``pip`` into a fresh venv without system packages;
  made in a temporary folder and renamed into place, so a failed install leaves nothing;
- builds are cached by what they depend on (the backbone folder's files, precision,
  options) under ``~/.cache/ptedge/genai-builds`` (``$PTEDGE_GENAI_BUILDS``).

The builder reads the *plain* backbone folder; ptedge adds the prompt rows and task heads
to its graph afterwards (``ptedge.export.decoder_graph``).

Not responsible for: editing the built graph, checks, bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GENAI_VERSION = "0.18.0"
BUILDER_REQUIREMENTS = [
    "torch==2.13.0",  # pinned: an open range pulls a multi-GB CUDA build
    "transformers>=5,<6",
    f"onnxruntime-genai=={GENAI_VERSION}",
    "onnxruntime>=1.31",
    "onnx>=1.23",
    "onnx-ir>=0.1",
    "tqdm>=4.60",
]
# builder model types that ptedge's graph edits are tested on (Llama-style decoders)
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


class BuilderError(RuntimeError):
    """The builder environment could not be made or the builder failed; says which and why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env_dir() -> Path:
    """The builder's virtual environment folder (it may not exist yet)."""
    env = os.environ.get("PTEDGE_GENAI_BUILDER")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ptedge" / f"genai-builder-{GENAI_VERSION}"


def builds_dir() -> Path:
    env = os.environ.get("PTEDGE_GENAI_BUILDS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ptedge" / "genai-builds"


def supports(backbone_dir: str | Path) -> bool:
    """Whether the backbone is a decoder this module builds (by its config's model_type)."""
    path = Path(backbone_dir) / "config.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("model_type") in SUPPORTED_TYPES


def _stamp() -> str:
    return "\n".join(BUILDER_REQUIREMENTS) + "\n"


def ensure_env() -> Path:
    """The builder environment's python, making the environment first if needed."""
    env = env_dir()
    python = env / "bin" / "python"
    stamp = env / ".ptedge-requirements"
    if python.is_file() and stamp.is_file() and stamp.read_text() == _stamp():
        return python
    if env.exists():
        raise BuilderError(
            f"{env}: exists but was not made for {' '.join(BUILDER_REQUIREMENTS)}; "
            "remove it (ptedge makes it again) or point $PTEDGE_GENAI_BUILDER elsewhere"
        )
    env.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=env.parent))
    _log(
        f"making onnxruntime-genai's builder environment in {env} (once; pip install "
        f"{' '.join(BUILDER_REQUIREMENTS)}) ..."
    )
    try:
        # a venv must be made where it will live (its scripts name their own path), so make
        # it in tmp, install, then rename: scripts in bin/ are not used, only bin/python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(tmp)], check=True)
        pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q"]
        done = subprocess.run(
            [*pip, "--disable-pip-version-check", *BUILDER_REQUIREMENTS],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise BuilderError(
                f"pip could not install the builder environment: {done.stderr.strip()[-2000:]}"
            )
        (tmp / ".ptedge-requirements").write_text(_stamp())
        tmp.rename(env)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return python


def _folder_key(folder: Path) -> str:
    """Hash of a backbone folder's files (names, sizes, mtimes), cheap for large weights."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build(backbone_dir: str | Path, precision: str, options: dict[str, str]) -> Path:
    """The builder's output folder for ``backbone_dir`` (cached): ``model.onnx`` (+ data),
    ``genai_config.json`` and the tokenizer files. ``precision``: fp32 | int4 | int8."""
    src = Path(backbone_dir).resolve()
    opts = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    key = hashlib.sha256(
        f"{_folder_key(src)}|{precision}|{opts}|{GENAI_VERSION}".encode()
    ).hexdigest()[:20]
    out = builds_dir() / f"{src.name}-{precision}-{key}"
    if (out / "genai_config.json").is_file():
        return out
    python = ensure_env()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    cmd = [
        str(python),
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(src),
        "-o",
        str(tmp / "model"),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(tmp / "cache"),
    ]
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in sorted(options.items()))]
    _log(f"onnxruntime-genai builder: {src.name}, {precision}, {opts or 'default options'} ...")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not (tmp / "model" / "genai_config.json").is_file():
            tail = (done.stdout + done.stderr).strip()[-3000:]
            raise BuilderError(f"onnxruntime-genai's builder failed ({' '.join(cmd)}):\n{tail}")
        (tmp / "model").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
