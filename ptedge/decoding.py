"""Token-by-token decoding with a KV-cache decoder in onnxruntime, torch-free.

The decoder graph (exported by optimum, see ``ptedge.export.decoder``) takes
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key|value``
and returns ``logits`` and ``present.{i}.key|value``. ``decode`` runs the prompt once,
then one token per step, choosing greedily (``temperature=0``) or by sampling with
temperature, top-k and top-p, and stops each row at end-of-sequence.

Not responsible for: encoding prompts (``ptedge.template``), loading bundles.
"""

from __future__ import annotations

import numpy as np


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past key/values for every ``past_key_values.*`` input."""
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape  # (batch, kv_heads, past_len, head_dim)
            feeds[i.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return feeds


def choose(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """Next token per row from logits (B, V): argmax, or a sample from the filtered softmax."""
    if not temperature:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / temperature  # (B, V)
    if top_k:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]  # (B, 1)
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # (B, V)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)  # (B, V)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the first
        mask = np.zeros_like(keep)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[1], p=row) for row in p])


def decode(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens per row (eos excluded) for left-padded prompts input_ids (B, T)."""
    rng = np.random.default_rng(seed)
    batch = input_ids.shape[0]
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past_names = [n.replace("present.", "past_key_values.") for n in outputs[1:]]
    mask = attention_mask.astype(np.int64)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)  # (B, T): left padding takes no positions
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": mask,
        **empty_past(session, batch),
    }
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        if "position_ids" in names:
            feeds["position_ids"] = positions
        logits, *present = session.run(outputs, feeds)  # logits (B, t, V)
        nxt = choose(logits[:, -1], rng, temperature, top_k, top_p)  # (B,)
        for b in range(batch):
            if not done[b]:
                if nxt[b] == eos_id:
                    done[b] = True
                else:
                    out[b].append(int(nxt[b]))
        if done.all():
            break
        nxt = np.where(done, pad_id, nxt)
        feeds = {
            "input_ids": nxt[:, None].astype(np.int64),
            "attention_mask": (mask := np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)),
            **dict(zip(past_names, present, strict=True)),
        }
        positions = positions[:, -1:] + 1  # (B, 1)
    return out
