"""Parity checks: every exported graph must reproduce the training-time model.

Three checks, each raising ``ParityError`` with the task, the output and the difference:

- ``check_fused``: the fused PyTorch task graph against the unfused models, before
  any ONNX is written (``FUSE_ATOL``);
- ``check_parity``: an onnxruntime task-graph session against PyTorch on real records
  (``fp32_tolerance``: ``PARITY_ATOL``, or ``PARITY_RTOL`` of the largest score; a looser,
  relative tolerance for fp16, ``ptedge.export.half``);
- ``check_generation_parity``: a KV-cache decoder's greedy tokens against PyTorch's.

Not responsible for: running graphs on records (``ptedge.export.scoring``), the int8
guard, which measures accuracy rather than parity (``ptedge.export.quantize``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from ptedge.export.half import fp16_tolerance
from ptedge.export.scoring import (
    graph_inputs,
    next_token_logits,
    onnx_generate,
    onnx_scores,
    output_name,
    torch_generate,
    unfused_scores,
)

PARITY_ATOL = 2e-3  # largest |onnxruntime - PyTorch| score allowed, fp32 ...
PARITY_RTOL = 1e-4  # ... or this share of the largest |score|, if more (large logits)
FUSE_ATOL = 1e-4  # largest |fused - unfused| score allowed, both in PyTorch
PARITY_NEW_TOKENS = 16  # greedy tokens compared per record for decoders


class ParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond tolerance."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_fused(graph, runs, samples: list[list[dict]]) -> None:
    """The fused PyTorch graph must reproduce each unfused model before export."""
    for i, (run, recs) in enumerate(zip(runs, samples, strict=True)):
        inputs = {k: torch.from_numpy(v) for k, v in graph_inputs(run, recs).items()}
        with torch.inference_mode():
            fused = graph(**inputs)[i].float().numpy()
        diff = float(np.abs(fused - unfused_scores(run, recs)).max())
        if diff > FUSE_ATOL:
            raise ParityError(f"task {run.name}: fused graph differs from training model by {diff}")


def fp32_tolerance(ref: np.ndarray) -> float:
    """``PARITY_ATOL``, or ``PARITY_RTOL`` of the largest reference score where that is
    more: a causal LM's vocabulary logits reach tens, and a fused graph (the builder's
    attention and norms) sums them in another order, a few 1e-3 apart in float32."""
    return max(PARITY_ATOL, PARITY_RTOL * float(np.abs(ref).max()))


def check_parity(
    session,
    runs,
    samples: list[list[dict]],
    tolerance: Callable[[np.ndarray], float] | None = None,
) -> dict:
    """Per task: largest |onnxruntime - PyTorch| score and label agreement; raises above
    ``tolerance(reference scores)`` (fp32: ``fp32_tolerance``; fp16: ``fp16_tolerance``)."""
    tolerance = tolerance or fp32_tolerance
    report = {}
    for run, recs in zip(runs, samples, strict=True):
        ref = unfused_scores(run, recs)
        got = onnx_scores(session, run, recs)
        diff = float(np.abs(ref - got).max())
        tol = tolerance(ref)
        agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
        report[run.name] = {"max_abs_diff": diff, "labels_equal": agree, "n": len(recs)}
        _log(
            f"parity {run.name}: output {output_name(run.name)} max |diff| {diff:.2e} "
            f"(tolerance {tol:.1e}), labels equal {agree:.3f} on {len(recs)} records"
        )
        if diff > tol:
            raise ParityError(
                f"task {run.name}: output {output_name(run.name)} differs from PyTorch by "
                f"{diff:.3e} (tolerance {tol:.3e})"
            )
    return report


def check_generation_parity(session, run, records: list[dict], half: bool = False) -> dict:
    """Greedy tokens of onnxruntime vs PyTorch; raises ParityError if any record differs.

    ``half``: an fp16 decoder; raises only if the prompt's next-token logits differ
    beyond the fp16 tolerance, and reports how many greedy continuations are equal.
    """
    ref = torch_generate(run, records, PARITY_NEW_TOKENS)
    got = onnx_generate(session, run, records, PARITY_NEW_TOKENS)
    same = [a == b for a, b in zip(ref, got, strict=True)]
    report = {
        "greedy_tokens_equal": float(np.mean(same)),
        "n": len(records),
        "new_tokens": PARITY_NEW_TOKENS,
    }
    if half:
        ref_logits, got_logits = next_token_logits(session, run, records)
        diff, tol = float(np.abs(ref_logits - got_logits).max()), fp16_tolerance(ref_logits)
        report["next_token_max_abs_diff"] = diff
        if diff > tol:
            raise ParityError(
                f"task {run.name}: fp16 next-token logits differ from PyTorch by {diff:.3e} "
                f"(tolerance {tol:.3e})"
            )
        return report
    if not all(same):
        i = same.index(False)
        raise ParityError(
            f"task {run.name}: greedy tokens differ on record {i}: "
            f"PyTorch {ref[i]} vs onnxruntime {got[i]}"
        )
    return report
