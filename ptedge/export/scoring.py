"""Scoring records with an exported graph and with the training-time reference model.

The one place that turns records into a graph's feeds and reads its outputs at export
time: task graphs (``onnx_scores``), KV-cache decoders (``onnx_generate``), and the
unfused PyTorch model they are compared with (``unfused_scores``, ``torch_generate``).
Both the parity checks (``ptedge.export.parity``) and the int8 guard
(``ptedge.export.guard``) build on it.

Not responsible for: tolerances and verdicts (``parity``), the torch-free runtime
(``ptedge.runtime`` has its own, equivalent encoding of feeds).
"""

from __future__ import annotations

import numpy as np
import torch

from ptedge.decoding import decode, empty_past
from ptedge.template import encode, with_pseudo_base


def output_name(task: str) -> str:
    """The task graph's output holding ``task``'s scores."""
    return f"scores.{task}"


def graph_inputs(run, records: list[dict]) -> dict[str, np.ndarray]:
    """Task-graph feeds (B, T) / (B,) of records, pseudo ids at the bundle's base."""
    enc = encode(run.compiled, run.tok, records)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "slot": enc.slot}


def onnx_scores(session, run, records: list[dict]) -> np.ndarray:
    """Scores (B, L|V) of ``run``'s task from a task-graph session."""
    feeds = graph_inputs(run, records)
    names = {i.name for i in session.get_inputs()}  # a head that ignores the slot drops it
    out = session.run([output_name(run.name)], {k: v for k, v in feeds.items() if k in names})[0]
    return out.astype(np.float32)


def unfused_scores(run, records: list[dict]) -> np.ndarray:
    """Scores (B, L|V) of the training-time model (pseudo ids from V, as in training)."""
    compiled = with_pseudo_base(run.compiled, run.cfg.vocab_size)
    enc = encode(compiled, run.tok, records)
    with torch.inference_mode():
        out = run.task.model(
            torch.from_numpy(enc.input_ids),
            torch.from_numpy(enc.attention_mask),
            torch.from_numpy(enc.slot),
        )
    return out.float().numpy()


def onnx_generate(session, run, records: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from a KV-cache decoder session, batched with left padding."""
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
