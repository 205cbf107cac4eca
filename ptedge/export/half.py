"""fp16 bundles for GPUs: the exported fp32 graph converted to half precision.

Weights and intermediate tensors become float16; the graph's inputs and outputs keep
their types (int64 ids, float32 scores, logits and past key/values), so the runtime,
the protocol of ``docs/bundle-format.md`` and every client read an fp16 bundle exactly
as an fp32 one. We convert the fp32 ONNX graph that already passed its parity check,
with onnxruntime's float16 converter (its default block list keeps the ops that need
float32 in float32), rather than export a half-precision PyTorch model: PyTorch on CPU
lacks half kernels for some traced ops, and one export path is easier to trust.

On the CPU provider onnxruntime runs the converted graph by casting around the ops
that have no float16 kernel, so an fp16 bundle works everywhere but only pays off on
GPUs (``providers=["CUDAExecutionProvider", ...]``): half the size, and tensor cores.

Parity: float16 keeps 11 significant bits, and the rounding adds up over the layers,
so the fp16 graph is held to a tolerance relative to the largest score,
``FP16_RTOL * max(1, max |score|)``, instead of fp32's absolute one. Measured: at most
1e-3 of the largest score on MiniLM (BANKING77) and SmolLM2 (LAMA P37, P36 decoder),
labels and greedy tokens equal on 32/32 records each.

Not responsible for: int8 (``ptedge.export.quantize``), choosing execution providers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FP16_RTOL = 1e-2  # largest |fp16 - PyTorch fp32| score, as a fraction of the largest score


def fp16_tolerance(reference: np.ndarray) -> float:
    """Largest |difference| allowed for fp16 scores against fp32 ``reference`` scores."""
    return FP16_RTOL * max(1.0, float(np.abs(reference).max()))


def convert_to_fp16(src: Path, dst: Path) -> None:
    """Write ``src`` (an fp32 .onnx) as float16 to ``dst``, inputs and outputs unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
