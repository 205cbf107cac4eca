"""Token-by-token decoding with a KV-cache decoder in onnxruntime, torch-free.

Two decoder graphs, both taking ``input_ids``, ``attention_mask`` and
``past_key_values.{i}.key|value`` and returning ``logits`` and ``present.{i}.key|value``:

- onnxruntime-genai's builder graph (``ptedge.export.decoder_graph``; its metadata says
  ``ptedge.kv_cache = shared``): ``GroupQueryAttention`` reads and writes one cache
  buffer per layer in place, (B, kv_heads, prompt + new tokens, head_size), allocated once
  and bound to both the past input and the present output (IO binding), so no step
  allocates or copies the cache. Each row's length (its count of ones in
  ``attention_mask``) places its rotary positions and its next key/value, so rows are
  right-padded and may differ in length;
- optimum's decoder (older bundles, backbones the builder does not take): the cache
  grows by one position per step and comes back as new arrays; rows are left-padded
  with explicit ``position_ids``.

``decode`` takes left-padded prompts either way, runs the prompt once, then one token
per step, choosing greedily (``temperature=0``) or by sampling with temperature, top-k
and top-p, and stops each row at end-of-sequence.

Not responsible for: encoding prompts (``ptedge.template``), loading bundles.
"""

from __future__ import annotations

import numpy as np

SHARED_CACHE = "ptedge.kv_cache"  # model metadata key; value "shared" (see module docstring)
HEAD_SIZE = "ptedge.head_size"


def shared_cache(session) -> int | None:
    """The head size of a shared-cache (builder) decoder, None for an optimum decoder."""
    meta = session.get_modelmeta().custom_metadata_map
    return int(meta[HEAD_SIZE]) if meta.get(SHARED_CACHE) == "shared" else None


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past key/values for every ``past_key_values.*`` input."""
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape  # (batch, kv_heads, past_len, head_dim)
            dim = dim if isinstance(dim, int) else shared_cache(session)
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
    head_size = shared_cache(session)
    if head_size is not None:
        return _decode_shared(
            session,
            input_ids,
            attention_mask,
            head_size,
            eos_id,
            pad_id,
            max_new_tokens,
            lambda logits: choose(logits, rng, temperature, top_k, top_p),
        )
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


def _decode_shared(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    head_size: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    pick,
) -> list[list[int]]:
    """``decode`` for a shared-cache graph: buffers allocated once, bound in place."""
    import onnxruntime as ort

    batch, width = input_ids.shape
    lengths = attention_mask.sum(-1).astype(np.int64)  # (B,)
    ids = np.full((batch, width), pad_id, dtype=np.int64)  # (B, T) right-padded
    for b in range(batch):
        ids[b, : lengths[b]] = input_ids[b, width - lengths[b] :]
    outputs = [o.name for o in session.get_outputs()]
    past = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    total = width + max_new_tokens
    io = session.io_binding()
    for name in outputs[1:]:
        spec = past[name.replace("present.", "past_key_values.")]
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        kv_heads = spec.shape[1]
        buf = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, kv_heads, total, head_size), dtype)  # (B, kv, T + new, hd)
        )
        io.bind_ortvalue_input(spec.name, buf)
        io.bind_ortvalue_output(name, buf)
    vocab = session.get_outputs()[0].shape[-1]
    # numpy arrays the OrtValues wrap (no copy): read after each run without copying
    prompt_logits = np.zeros((batch, width, vocab), np.float32)  # (B, T, V)
    step_logits = np.zeros((batch, 1, vocab), np.float32)  # (B, 1, V)
    prompt_out = ort.OrtValue.ortvalue_from_numpy(prompt_logits)
    step_out = ort.OrtValue.ortvalue_from_numpy(step_logits)
    positions = np.arange(total)  # (T + new,)
    rows = np.arange(batch)
    count = lengths.copy()  # (B,) tokens in each row's cache after this step
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    feed, logits, logits_out, last = ids, prompt_logits, prompt_out, lengths - 1
    for _ in range(max_new_tokens):
        mask = (positions[: count.max()] < count[:, None]).astype(np.int64)  # (B, W)
        io.bind_cpu_input("input_ids", feed)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_ortvalue_output(outputs[0], logits_out)
        session.run_with_iobinding(io)
        nxt = pick(logits[rows, last])  # (B,)
        for b in np.flatnonzero(~done):
            if nxt[b] == eos_id:
                done[b] = True
            else:
                out[b].append(int(nxt[b]))
        if done.all():
            break
        feed = np.where(done, pad_id, nxt)[:, None].astype(np.int64)  # (B, 1)
        logits, logits_out, last = step_logits, step_out, np.zeros(batch, dtype=np.int64)
        count += 1
    return out
