"""Operator fusion of encoder task graphs before int8/int4 (onnxruntime's transformer
optimizer).

The plain TorchScript export spells attention, layer norm and GELU out in dozens of
small ops. onnxruntime's transformer optimizer rewrites a BERT-family encoder into its
fused kernels (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``); the int8 step
then turns ``Attention`` into ``QAttention`` (int8 Q/K/V weights). Measured on the
MiniLM / BANKING77 bundle (``runs/b77``), ``Predictor.predict`` at batch 1 on 200 test
sentences, 2 threads, the two bundles taking turns: p50 1.74 ms fused against 2.03 ms
unfused; test accuracy 0.7685 against 0.7688 (fp32 0.775). Recipes whose weights are
``MatMulNBits`` fuse without attention (``attention=False``): the fused ``Attention``
holds its Q/K/V weights itself, where no ``MatMulNBits`` can replace them.

The embedding fusion (``EmbedLayerNormalization``) is left off: it would take the word
embedding, prompt rows included, out of the plain ``Gather`` that ``ptedge.export.quant_graph``
stores quantized row by row (or block by block).

Not for decoders nor for fp32/fp16 bundles, whose graph stays the one checked against
PyTorch. Not responsible for quantizing (``ptedge.export.quantize``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

# transformers model types whose layers match the optimizer's BERT patterns
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet")


def encoder_shape(backbone_dir: str | Path) -> dict | None:
    """``{"num_heads", "hidden_size"}`` of a BERT-family backbone, else None."""
    path = Path(backbone_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in ENCODER_TYPES or cfg.get("is_decoder"):
        return None
    heads = cfg.get("num_attention_heads", cfg.get("n_heads"))
    hidden = cfg.get("hidden_size", cfg.get("dim"))
    if not heads or not hidden:
        return None
    return {"num_heads": int(heads), "hidden_size": int(hidden)}


def fuse_encoder(src: Path, dst: Path, shape: dict, attention: bool = True) -> dict:
    """Write the fused graph of ``src`` to ``dst``; returns the count of each fused op.
    ``attention=False`` leaves attention's MatMuls as they are (layer norms, GELU fused)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    options.enable_attention = attention
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        model = optimize_model(
            str(src),
            model_type="bert",
            num_heads=shape["num_heads"],
            hidden_size=shape["hidden_size"],
            opt_level=0,  # graph rewrites only; onnxruntime optimizes again at load
            optimization_options=options,
        )
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(dst))
    finally:
        quiet.setLevel(level)
    return stats
