"""Export a ``--head generate`` run as a KV-cache decoder that onnxruntime steps through.

The prompt table is fused into the embedding exactly as for classification (rows
``V..V+n-1``, LM head kept at V outputs and untied), then optimum exports the fused
causal LM with its ``text-generation-with-past`` task: one graph taking past
key/values, so each new token costs one position, not the whole sequence. We use
optimum here (and not for task graphs) because its decoder export already handles
the cache inputs/outputs and the patches TorchScript needs for transformers' cache
classes; our own wrapper would duplicate that. Parity: greedy decoding in
onnxruntime (``ptedge.decoding``) must give the same tokens as the unfused PyTorch
model's greedy decoding on real records. An fp16 decoder rounds enough to flip a near
tie some tokens in, so it is held instead to the fp16 tolerance (``ptedge.half``) on
the next-token logits of the prompt, and its greedy agreement is reported.

Not responsible for: bundle writing and int8 (``ptedge.export``, ``ptedge.quantize``).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ptedge.decoding import decode, empty_past
from ptedge.fuse import prompt_table
from ptedge.template import encode

PARITY_NEW_TOKENS = 16  # greedy tokens compared per record at export


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


def onnx_generate(session, run, records: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from the ONNX decoder, batched with left padding."""
    enc = encode(run.compiled, run.tok, records, padding_side="left")
    return decode(
        session,
        enc.input_ids,
        enc.attention_mask,
        run.cfg.eos_id,
        run.compiled["pad_id"],
        max_new_tokens,
    )


def torch_generate(run, records: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from the unfused training-time model (pseudo ids from V)."""
    enc = encode(run.compiled, run.tok, records, padding_side="left")
    return run.task.model.greedy(
        torch.from_numpy(enc.input_ids),
        torch.from_numpy(enc.attention_mask),
        max_new_tokens,
        run.cfg.eos_id,
    )


def next_token_logits(session, run, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Logits (B, V) after each prompt: (unfused PyTorch, onnxruntime decoder)."""
    enc = encode(run.compiled, run.tok, records, padding_side="left")
    ids, mask = torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding takes no positions
    with torch.inference_mode():
        ref = run.task.model.lm_head(run.task.model.hidden(ids, mask, pos)[:, -1])  # (B, V)
    feeds = {
        "input_ids": enc.input_ids.astype(np.int64),
        "attention_mask": enc.attention_mask.astype(np.int64),
        "position_ids": pos.numpy(),
        **empty_past(session, len(records)),
    }
    names = {i.name for i in session.get_inputs()}
    got = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][:, -1]
    return ref.float().numpy(), got


def check_generation_parity(session, run, records: list[dict], half: bool = False) -> dict:
    """Greedy tokens of onnxruntime vs PyTorch; raises ParityError if any record differs.

    ``half``: an fp16 decoder; raises only if the prompt's next-token logits differ
    beyond the fp16 tolerance, and reports how many greedy continuations are equal.
    """
    from ptedge.export import ParityError
    from ptedge.half import fp16_tolerance

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
