"""Export a ``--head generate`` run as a KV-cache decoder that onnxruntime steps through.

The prompt table is fused into the embedding exactly as for classification (rows
``V..V+n-1``, LM head kept at V outputs and untied), then optimum exports the fused
causal LM with its ``text-generation-with-past`` task: one graph taking past
key/values, so each new token costs one position, not the whole sequence. We use
optimum here (and not for task graphs) because its decoder export already handles
the cache inputs/outputs and the patches TorchScript needs for transformers' cache
classes; our own wrapper would duplicate that. Its parity check (greedy tokens equal
to the unfused PyTorch model's; fp16 decoders held to a logit tolerance instead, since
rounding flips near ties some tokens in) lives in ``ptedge.export.parity``.

Not responsible for: checks, bundle writing and int8 (the rest of ``ptedge.export``).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ptedge.fuse import prompt_table


def fused_causal_lm(model) -> torch.nn.Module:
    """A copy of the run's causal LM with the prompt rows appended to its embedding."""
    lm = copy.deepcopy(model.backbone)
    emb = lm.get_input_embeddings()
    V, H = emb.weight.shape
    table = prompt_table(model)  # (n, H)
    fused = torch.nn.Embedding(V + table.shape[0], H, padding_idx=emb.padding_idx)
    with torch.no_grad():
        fused.weight[:V] = emb.weight
        fused.weight[V:] = table
    lm.config.tie_word_embeddings = False  # the LM head keeps its V-row matrix
    lm.set_input_embeddings(fused)
    return lm.eval()


def export_decoder(model, path: Path) -> None:
    """Write the fused decoder with past key/values to ``path`` (one .onnx file)."""
    from optimum.exporters.onnx import onnx_export_from_model

    lm = fused_causal_lm(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer noise; the greedy-token parity decides
        onnx_export_from_model(lm, tmp, task="text-generation-with-past", do_validation=False)
        files = list(Path(tmp).glob("model.onnx*"))
        if len(files) != 1:  # external data would need a second file in the bundle
            raise RuntimeError(f"optimum wrote {[f.name for f in files]}, expected model.onnx")
        shutil.move(str(files[0]), path)
