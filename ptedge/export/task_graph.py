"""The ONNX task graph: ``torch.onnx.export`` of a fused classification/vocabulary graph.

A task graph (``ptedge.fuse.TaskGraph``) maps ``input_ids``, ``attention_mask`` and
``slot`` to each task's scores at the answer slot. We export it with the TorchScript
exporter (``dynamo=False``): its custom inputs and outputs are none of optimum's task
types, and the TorchScript path gave dynamic batch and length on both BERT and Llama.

Not responsible for: decoders (``ptedge.export.decoder``), checking the result
(``ptedge.export.parity``), quantization, bundle files.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ptedge.export.scoring import graph_inputs, output_name

OPSET = 17


@contextmanager
def traceable_masks():
    """Swap in optimum's TorchScript-safe attention-mask builders while tracing.

    transformers >= 4.53 builds masks with vmap, which TorchScript cannot trace;
    optimum's ONNX model patcher ships vmap-free replacements, reused here.
    """
    from optimum.exporters.onnx import model_patcher as mp
    from transformers import masking_utils as mu

    masks = mu.ALL_MASK_ATTENTION_FUNCTIONS
    packed = mu.find_packed_sequence_indices
    masks.register("sdpa", mp.sdpa_mask_without_vmap)
    masks.register("eager", mp.eager_mask_without_vmap)
    mu.find_packed_sequence_indices = mp.find_packed_sequence_indices_patched
    try:
        yield
    finally:
        masks.register("sdpa", mu.sdpa_mask)
        masks.register("eager", mu.eager_mask)
        mu.find_packed_sequence_indices = packed


def trace_example(run, records: list[dict]) -> tuple[torch.Tensor, ...]:
    """Two encoded records plus one padding column, so tracing takes the padded-mask path
    (an all-ones mask lets transformers skip building the mask, and tracing would keep that)."""
    inputs = graph_inputs(run, records[:2])
    ids = np.pad(inputs["input_ids"], ((0, 0), (0, 1)), constant_values=run.compiled["pad_id"])
    mask = np.pad(inputs["attention_mask"], ((0, 0), (0, 1)))
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(inputs["slot"])


def export_onnx(graph, runs, sample: list[dict], path: Path) -> None:
    """torch.onnx.export (TorchScript) with dynamic batch and length."""
    args = trace_example(runs[0], sample)
    outputs = [output_name(r.name) for r in runs]
    dyn = {
        "input_ids": {0: "batch", 1: "length"},
        "attention_mask": {0: "batch", 1: "length"},
        "slot": {0: "batch"},
    }
    dyn.update({o: {0: "batch"} for o in outputs})
    # the TorchScript tracer warns about every data-dependent Python branch in
    # transformers; parity checks below are what tells whether the graph is right
    with torch.inference_mode(), traceable_masks(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=["input_ids", "attention_mask", "slot"],
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
        )
