"""Mobile: convert a bundle's ONNX model to onnxruntime's ORT format.

ORT format is what onnxruntime's mobile packages and reduced ("minimal") builds load:
a flatbuffer of the graph already optimized, so the app skips graph optimization at
start-up. ``convert_to_ort`` writes ``model.ort`` (``model.int8.ort`` for
``model.int8.onnx``) next to the ONNX file, plus ``<stem>.required_operators.config``,
the operator list for a reduced build (``build.sh --minimal_build
--include_ops_by_config FILE``), then checks that the ORT-format session reproduces the
ONNX session's scores. It does what ``python -m
onnxruntime.tools.convert_onnx_models_to_ort --optimization_style Fixed`` does for one
file, without its directory scan and printing.

Torch-free: imports only onnxruntime (and its bundled tools).

Not responsible for: the manifest (the caller stores the returned dict), runtime choice
of the file (``ptedge.runtime``), building onnxruntime for a phone.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ORT_PARITY_ATOL = 1e-4  # largest |ORT format - ONNX| score allowed
LEVELS = ("basic", "extended", "all")


class OrtConversionError(RuntimeError):
    """The ORT-format model cannot be written, or differs from the ONNX model."""


@contextmanager
def _bare_ort_tools():
    """Import onnxruntime's ORT-format tools without ``onnxruntime/tools/__init__.py``,
    which imports torch whenever it is installed (for PyTorch helpers we do not use)."""
    import onnxruntime

    name = "onnxruntime.tools"
    if name in sys.modules:
        yield
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "tools")]
    sys.modules[name] = pkg
    try:
        yield
    finally:  # a later `import onnxruntime.tools` runs the real __init__
        if sys.modules.get(name) is pkg:
            del sys.modules[name]
        if getattr(onnxruntime, "tools", None) is pkg:
            delattr(onnxruntime, "tools")


def _level(name: str):
    import onnxruntime as ort

    return {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def probe_feeds(session, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A small two-row batch (one row right-padded) of low token ids, valid for any
    vocabulary, for every input ``session`` declares: a task graph's ``input_ids``,
    ``attention_mask``, ``slot``, or a KV-cache decoder's ``position_ids`` and empty
    ``past_key_values.*``."""
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, pad_id, pad_id, pad_id]])
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    known = {
        "input_ids": ids,
        "attention_mask": mask,
        "slot": np.array([7, 4]),
        "position_ids": np.maximum(mask.cumsum(-1) - 1, 0),
    }
    feeds = {}
    for i in session.get_inputs():
        if i.name in known:
            feeds[i.name] = known[i.name].astype(np.int64)
        elif i.name.startswith("past_key_values.") and len(i.shape) == 4:
            _, heads, _, dim = i.shape  # (batch, kv_heads, past_len, head_dim)
            feeds[i.name] = np.zeros((2, heads, 0, dim), dtype=np.float32)
        else:
            raise OrtConversionError(f"no probe value for model input {i.name!r}; pass feeds=")
    return feeds


def convert_to_ort(
    bundle_dir: Path,
    model_file: str,
    *,
    optimization: str = "all",
    feeds: dict[str, np.ndarray] | None = None,
    atol: float = ORT_PARITY_ATOL,
) -> dict:
    """Write ``<stem>.ort`` and ``<stem>.required_operators.config`` for ``model_file``.

    ``optimization``: graph optimizations baked into the file (basic | extended | all;
    "all" skips the x86-only NCHWc layout, as onnxruntime's converter does).
    ``feeds``: inputs for the parity check (default: ``probe_feeds``; pass encoded real
    records where available). Raises ``OrtConversionError`` when the ORT-format
    model's scores differ from the ONNX model's by more than ``atol``.

    Returns the manifest entry: file names, onnxruntime version, optimization, parity.
    """
    import onnxruntime as ort

    with _bare_ort_tools():
        from onnxruntime.tools.ort_format_model import create_config_from_models

    if optimization not in LEVELS:
        raise ValueError(f"optimization {optimization!r}: choose one of {', '.join(LEVELS)}")
    bundle_dir = Path(bundle_dir)
    src = bundle_dir / model_file
    if not src.is_file() or src.suffix != ".onnx":
        raise FileNotFoundError(f"{src}: no such .onnx model in the bundle")
    stem = src.name[: -len(".onnx")]
    dst = bundle_dir / f"{stem}.ort"
    config = bundle_dir / f"{stem}.required_operators.config"
    providers = ["CPUExecutionProvider"]

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(optimization)
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "0")  # portable to x86 and arm
    try:
        ort.InferenceSession(
            str(src), so, providers=providers, disabled_optimizers=["NchwcTransformer"]
        )
        create_config_from_models([dst], config, False)
        # its header names the model by absolute path (a temporary folder during export)
        config.write_text(config.read_text().replace(str(dst.resolve()), dst.name))
    except Exception as e:  # onnxruntime raises its own exception types
        dst.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
        raise OrtConversionError(f"{src}: conversion to ORT format failed ({e})") from None

    ref_sess = ort.InferenceSession(str(src), providers=providers)
    ort_sess = ort.InferenceSession(str(dst), providers=providers)
    feeds = feeds if feeds is not None else probe_feeds(ref_sess)
    wanted = {i.name for i in ref_sess.get_inputs()}  # a mean-pooling head reads no slot
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    names = [o.name for o in ref_sess.get_outputs()]
    if [o.name for o in ort_sess.get_outputs()] != names:
        raise OrtConversionError(f"{dst}: outputs differ from {src.name}'s {names}")
    ref = ref_sess.run(names, feeds)
    got = ort_sess.run(names, feeds)
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(ref, got, strict=True))
    labels = min(  # over score outputs, not a decoder's present.* key/values
        float((a.argmax(-1) == b.argmax(-1)).mean())
        for n, a, b in zip(names, ref, got, strict=True)
        if not n.startswith("present.")
    )
    if diff > atol:
        del ort_sess
        dst.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
        raise OrtConversionError(
            f"{dst}: scores differ from {src.name} by {diff:.3e} (tolerance {atol})"
        )
    return {
        "file": dst.name,
        "source": src.name,
        "operators_config": config.name,
        "onnxruntime_version": ort.__version__,
        "optimization_level": optimization,
        "optimization_style": "Fixed",
        "parity": {
            "max_abs_diff": diff,
            "labels_equal": labels,
            "n": int(len(feeds["input_ids"])),
        },
    }
