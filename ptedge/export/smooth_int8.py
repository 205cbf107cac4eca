"""int8 with integer arithmetic for the builder's float task graphs: smoothed activations
quantized per token, integer MatMuls with 7-bit weights.

Why: on SmolLM2 task graphs (40 tokens) onnxruntime 1.32's ``MatMulNBits`` (8-bit
blocks, int8 activations per block, accuracy level 4) runs no faster than float
``MatMul``: 147 vs 126 us for the 576x960 projection, where ``MatMulIntegerToFloat``
(uint8 activations x int8 weights, this CPU's AVX-512 VNNI) takes 48 us. But SmolLM2's
activations have outlier channels (``tools/int8_outliers.py``: single channels run up to
9,000x the median), which one scale per tensor cannot hold (SST-2 test 0.837 -> 0.756).
Two things keep accuracy:

- SmoothQuant (Xiao et al., 2023) moves range from the activations into the weights:
  for a MatMul group ``X @ W`` (the MatMuls reading one tensor ``X``), channel ``j`` of
  ``X`` is divided by ``s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)`` and row
  ``j`` of every ``W`` multiplied by it, which leaves ``X @ W`` unchanged. The division
  is folded into the op that makes ``X``, so no node is added: an RMSNorm output
  (``(Skip)SimplifiedLayerNormalization``: qkv, gate and up projections) divides its
  weight ``gamma``; ``silu(gate) * up`` (the down projection) divides the up
  projection's columns; anything else (the attention output read by o_proj) is left;
- one activation scale per token, ``max|x_t| / 127``, computed in the graph (a few
  elementwise nodes per group): a token's scale depends on that token alone, so a
  record's answer does not depend on what else is in its batch.

Each MatMul then becomes ``MatMulIntegerToFloat`` (int8 weights within +-64, one scale
per output column: ``quant_graph.MATMUL_WEIGHT_PEAK``, so AVX2 CPUs do not saturate) times
the token's scale. ``channel_peaks`` measures ``max|X_j|`` on real
records through the float graph (per record, then averaged). SmolLM2 SST-2 bench run, 256
calibration records, test 872 (fp32 0.8372): 0.8349; with the max over records instead of
the mean, 0.8200 and 0.8349 on two calibration samples. Alpha 0.65 or 0.8, or one alpha
per group chosen by its output error, gave no smaller score error on dev
(``docs/results/analyses.md``).

Not responsible for: building the float graph (``ptedge.export.causal``), choosing the
recipe or checking accuracy (``ptedge.export.guard``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptedge.export import decoder_graph
from ptedge.export.quant_graph import (
    HEAD_PREFIXES,
    MATMUL_WEIGHT_PEAK,
    quantize_embedding_rows,
    replace_node,
    symmetric_int8,
    tensor_values,
)

ALPHA = 0.5  # SmoothQuant's migration strength (its paper's default for most models)
NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _index(model):
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    return inits, consumers, producer


def groups(model) -> dict[str, list]:
    """Input tensor -> the float MatMuls with a constant 2-D weight reading it (heads
    excluded), for inputs that nothing but such MatMuls read."""
    inits, consumers, _ = _index(model)
    found: dict[str, list] = {}
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or n.name.startswith(HEAD_PREFIXES):
            continue
        found.setdefault(n.input[0], []).append(n)
    return {x: mms for x, mms in found.items() if len(consumers[x]) == len(mms)}


def channel_peaks(
    source: Path, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel peak (C,) of each named float tensor (..., C) of the graph at
    ``source``: each record's max|x| over its tokens, averaged over ``feeds`` (batches of
    one record: no padding enters them). The mean, not the max over all records: a max is
    set by the one most extreme record, and two 256-record samples then gave smoothing
    factors 1.5 SST-2 test points apart."""
    total = dict.fromkeys(names, 0.0)
    for values in tensor_values(source, names, feeds):
        for x, v in zip(names, values, strict=True):
            total[x] = total[x] + np.abs(v.reshape(-1, v.shape[-1])).max(0)  # (C,)
    return {x: (t / len(feeds)).astype(np.float32) for x, t in total.items()}


def _smoothing(peak: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s (K,) from the activations' channel peaks (K,) and the group's weights [(K, N_i)]."""
    wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)  # (K,)
    s = np.maximum(peak, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def _up_of(mul, producer, consumers, inits):
    """The up projection of ``silu(gate) * up``: the MatMul with a constant weight that
    makes one of ``mul``'s inputs and whose weight and output nothing else reads; or None."""
    for x in mul.input:
        n = producer.get(x)
        if n is None or n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        if len(consumers[x]) == 1 and len(consumers[n.input[1]]) == 1:
            return n
    return None


def smooth(model, peaks: dict[str, np.ndarray], alpha: float = ALPHA) -> dict:
    """Fold SmoothQuant factors into ``model`` in place (``peaks``: ``channel_peaks`` of
    each group's input); returns how many groups were smoothed, by where the factor went."""
    from onnx import numpy_helper

    inits, consumers, producer = _index(model)
    done = {"norm": 0, "up_proj": 0, "none": 0}

    def arr(name):
        return numpy_helper.to_array(inits[name])

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for x, mms in groups(model).items():
        src = producer.get(x)
        target = None
        if src is not None and src.op_type in NORMS and src.output[0] == x:
            gamma = src.input[2] if src.op_type.startswith("Skip") else src.input[1]
            if gamma in inits and len(consumers[gamma]) == 1:
                target = ("norm", gamma)
        elif src is not None and src.op_type == "Mul":
            up = _up_of(src, producer, consumers, inits)
            if up is not None:
                target = ("up_proj", up.input[1])
        if target is None:
            done["none"] += 1
            continue
        weights = [arr(m.input[1]) for m in mms]
        s = _smoothing(peaks[x], weights, alpha)  # (K,)
        kind, name = target
        if kind == "norm":
            put(name, arr(name) / s)
        else:
            put(name, arr(name) / s[None, :])  # (H, K) columns
        for m, w in zip(mms, weights, strict=True):
            put(m.input[1], w * s[:, None])
        done[kind] += 1
    return done


def _per_token(g, x: str, opset: int) -> tuple[list, tuple[str, str, str, str]]:
    """Nodes quantizing ``x`` (..., K) per token: ``q = round(x * 127 / max|x_t|) + 128``
    as uint8 (..., K) and the token's scale ``max|x_t| / 127`` (..., 1). Returns the nodes
    and (q, unit scale, zero point, token scale): ``MatMulIntegerToFloat`` takes ``q``
    with the unit scale, and its output is multiplied by the token scale."""
    from onnx import helper, numpy_helper

    p = f"{x}/tok"
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        reduce = helper.make_node(
            "ReduceMax", [f"{p}/abs", f"{p}/axes"], [f"{p}/max0"], keepdims=1, name=f"{p}/Max"
        )
        g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axes"))
    else:
        reduce = helper.make_node(
            "ReduceMax", [f"{p}/abs"], [f"{p}/max0"], axes=[-1], keepdims=1, name=f"{p}/Max"
        )
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(1e-12, np.float32), f"{p}/eps"),
            numpy_helper.from_array(np.array(127.0, np.float32), f"{p}/127"),
            numpy_helper.from_array(np.array(1 / 127.0, np.float32), f"{p}/inv127"),
            numpy_helper.from_array(np.array(1.0, np.float32), f"{p}/one"),
            numpy_helper.from_array(np.array(128, np.uint8), f"{p}/zero"),
        ]
    )
    return (
        [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
            reduce,
            helper.make_node("Max", [f"{p}/max0", f"{p}/eps"], [f"{p}/max"], name=f"{p}/Eps"),
            helper.make_node("Div", [f"{p}/127", f"{p}/max"], [f"{p}/inv"], name=f"{p}/Inv"),
            helper.make_node("Mul", [x, f"{p}/inv"], [f"{p}/scaled"], name=f"{p}/Scale"),
            helper.make_node(
                "QuantizeLinear",
                [f"{p}/scaled", f"{p}/one", f"{p}/zero"],
                [f"{p}/q"],
                name=f"{p}/Q",
            ),
            helper.make_node("Mul", [f"{p}/max", f"{p}/inv127"], [f"{p}/s"], name=f"{p}/S"),
        ],
        (f"{p}/q", f"{p}/one", f"{p}/zero", f"{p}/s"),
    )


def quantize(model) -> int:
    """Every group's MatMuls as ``MatMulIntegerToFloat`` (7-bit int8 weights, one scale per
    output column; uint8 activations, one scale per token) times the token's scale, in
    place; returns how many MatMuls."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits, _, _ = _index(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    count = 0
    for x, mms in groups(model).items():
        first = min(list(g.node).index(m) for m in mms)
        nodes, (q, one, zero, token_scale) = _per_token(g, x, opset)
        for k, n in enumerate(nodes):
            g.node.insert(first + k, n)
        for m in mms:
            name = m.input[1]
            w = numpy_helper.to_array(inits[name]).astype(np.float32)  # (K, N)
            wq, col = symmetric_int8(w, axis=0, peak=MATMUL_WEIGHT_PEAK)  # (K, N), (1, N)
            g.initializer.remove(inits[name])
            g.initializer.extend(
                [
                    numpy_helper.from_array(wq, f"{name}.int8"),
                    numpy_helper.from_array(col[0], f"{name}.scale"),
                ]
            )
            unscaled = f"{m.output[0]}.unscaled"
            replace_node(
                model,
                m,
                [
                    helper.make_node(
                        "MatMulIntegerToFloat",
                        [q, f"{name}.int8", one, f"{name}.scale", zero],
                        [unscaled],
                        name=m.name,
                        domain="com.microsoft",
                    ),
                    helper.make_node(
                        "Mul", [unscaled, token_scale], [m.output[0]], name=f"{m.name}/TokenScale"
                    ),
                ],
            )
            count += 1
    return count


def write(fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]], alpha: float = ALPHA) -> dict:
    """The float graph at ``fp32`` smoothed, quantized and its word embedding per-row int8,
    written to ``out``; returns what was done, for the manifest."""
    model = decoder_graph.load(fp32)
    peaks = channel_peaks(fp32, list(groups(model)), feeds)
    smoothed = smooth(model, peaks, alpha)
    matmuls = quantize(model)
    table = quantize_embedding_rows(model)
    decoder_graph.save(model, out)
    return {
        "alpha": alpha,
        "smoothed": smoothed,
        "integer_matmuls": matmuls,
        "weight_peak": MATMUL_WEIGHT_PEAK,
        "embedding": table,
        "graph_nodes": len(model.graph.node),
    }
