"""Graph edits that turn onnxruntime-genai's decoder graph into ptedge graphs.

The builder (``ptedge.export.builder``) writes the plain backbone; three edits, each a
few nodes, make it ours:

- ``graft_prompt``: the prompt rows. Pseudo ids ``V..V+n-1`` read a float table (n, H)
  of their own; every other id reads the builder's word embedding, which may be an int4
  table shared with the LM head (``GatherBlockQuantized``). One ``Where`` per token picks
  between them, so the prompt keeps its trained float values at any precision and a tied
  LM head keeps V outputs (a pseudo token can never be generated);
- ``strip_cache``: a classification graph runs the whole input once, so the past
  key/value inputs go (``GroupQueryAttention`` then attends within the input) and the
  present outputs are no longer graph outputs;
- ``add_heads``: the task heads at the answer slot: hidden states (B, T, H) ->
  ``GatherND`` at ``slot`` (B,) -> (B, H) -> one ``MatMul`` per task into ``scores.TASK``
  (label rows of the LM head, or the whole LM head for open vocabulary), named
  ``/heads/...`` so int8 leaves them in float as it does in TorchScript task graphs.

``GroupQueryAttention`` computes rotary positions from each row's length
(``attention_mask``): a classification batch is right-padded (as ptedge encodes it), so
positions are 0..T-1 as in training; decoding feeds left-padded prompts one row at a
time or equal-length rows (``ptedge.decoding``).

Not responsible for: running the builder, checks, quantization, bundle files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT_TABLE = "ptedge.prompt_rows"
HIDDEN = "hidden_states"


def load(path: str | Path):
    """The ONNX model at ``path`` with its external weights loaded."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _node_reading(graph, name: str, op_types: tuple[str, ...]):
    hits = [n for n in graph.node if name in n.input and n.op_type in op_types]
    if len(hits) != 1:
        raise ValueError(f"expected one {'/'.join(op_types)} node reading {name!r}, found {hits}")
    return hits[0]


def graft_prompt(model, table: np.ndarray, vocab_size: int) -> None:
    """Give pseudo ids ``vocab_size + k`` the rows ``table[k]`` (n, H), in place (nothing
    to do for n = 0: a template without pseudo tokens)."""
    from onnx import TensorProto, helper, numpy_helper

    if not len(table):
        return
    g = model.graph
    emb = _node_reading(g, "input_ids", ("Gather", "GatherBlockQuantized"))
    words = emb.output[0] + ".words"
    out = emb.output[0]
    emb.output[0] = words
    n = table.shape[0]
    p = "/ptedge/prompt"
    emb.input[list(emb.input).index("input_ids")] = f"{p}/word_ids"
    g.initializer.extend(
        [
            numpy_helper.from_array(table.astype(np.float32), PROMPT_TABLE),  # (n, H)
            numpy_helper.from_array(np.array(vocab_size - 1, np.int64), f"{p}/last_word"),
            numpy_helper.from_array(np.array(vocab_size, np.int64), f"{p}/V"),
            numpy_helper.from_array(np.array(0, np.int64), f"{p}/zero"),
            numpy_helper.from_array(np.array(n - 1, np.int64), f"{p}/last_row"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}/minus_one"),
        ]
    )
    nodes = [
        # (B, T) ids clamped into the word table; pseudo rows read row V-1, then replaced
        helper.make_node(
            "Min", ["input_ids", f"{p}/last_word"], [f"{p}/word_ids"], name=f"{p}/Min"
        ),
        helper.make_node("Sub", ["input_ids", f"{p}/V"], [f"{p}/shifted"], name=f"{p}/Sub"),
        helper.make_node("Max", [f"{p}/shifted", f"{p}/zero"], [f"{p}/lo"], name=f"{p}/Max"),
        helper.make_node("Min", [f"{p}/lo", f"{p}/last_row"], [f"{p}/rows"], name=f"{p}/MinRow"),
        helper.make_node("Gather", [PROMPT_TABLE, f"{p}/rows"], [f"{p}/emb"], name=f"{p}/Gather"),
        helper.make_node(
            "GreaterOrEqual", ["input_ids", f"{p}/V"], [f"{p}/is_p"], name=f"{p}/IsPrompt"
        ),
        helper.make_node(
            "Unsqueeze", [f"{p}/is_p", f"{p}/minus_one"], [f"{p}/is_p3"], name=f"{p}/Unsqueeze"
        ),
    ]
    dtype = _elem_type(g, out)
    emb_f = f"{p}/emb"
    if dtype not in (None, TensorProto.FLOAT):
        nodes.append(helper.make_node("Cast", [emb_f], [f"{p}/emb.c"], to=dtype, name=f"{p}/Cast"))
        emb_f = f"{p}/emb.c"
    nodes.append(helper.make_node("Where", [f"{p}/is_p3", emb_f, words], [out], name=f"{p}/Where"))
    pos = list(g.node).index(emb)
    for k, node in enumerate(nodes):
        g.node.insert(pos + k, node)


def _elem_type(graph, name: str) -> int | None:
    for v in list(graph.value_info) + list(graph.output):
        if v.name == name:
            return v.type.tensor_type.elem_type
    return None


def strip_cache(model) -> None:
    """Drop the past key/value inputs and present outputs (a whole-input graph), in place."""
    g = model.graph
    past = {i.name for i in g.input if i.name.startswith("past_key_values.")}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in past:
                node.input[k] = ""
    keep_in = [i for i in g.input if i.name not in past]
    keep_out = [o for o in g.output if not o.name.startswith("present.")]
    del g.input[:]
    g.input.extend(keep_in)
    del g.output[:]
    g.output.extend(keep_out)


def add_heads(model, heads: list[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
    """Scores at the slot: ``heads`` = (output name, weight (L, H), bias (L,) or None),
    read from the builder's ``hidden_states`` (B, T, H) output (``exclude_lm_head``)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if not any(o.name == HIDDEN for o in g.output):
        raise ValueError(f"the graph has no {HIDDEN!r} output (build with exclude_lm_head)")
    p = "/heads"
    g.input.append(helper.make_tensor_value_info("slot", TensorProto.INT64, ["batch_size"]))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{p}/axis1"))
    g.node.extend(
        [
            helper.make_node("Unsqueeze", ["slot", f"{p}/axis1"], [f"{p}/slot2"], name=f"{p}/U"),
            # (B, T, H) at (B, 1) -> (B, H)
            helper.make_node(
                "GatherND", [HIDDEN, f"{p}/slot2"], [f"{p}/at_slot"], batch_dims=1, name=f"{p}/At"
            ),
        ]
    )
    outputs = []
    for name, weight, bias in heads:
        w = f"{p}/{name}/weight"
        g.initializer.append(numpy_helper.from_array(weight.T.astype(np.float32).copy(), w))
        mm = f"{p}/{name}/MatMul"
        g.node.append(
            helper.make_node(
                "MatMul", [f"{p}/at_slot", w], [name if bias is None else f"{mm}.out"], name=mm
            )
        )
        if bias is not None:
            g.initializer.append(numpy_helper.from_array(bias.astype(np.float32), f"{p}/{name}/b"))
            g.node.append(
                helper.make_node("Add", [f"{mm}.out", f"{p}/{name}/b"], [name], name=f"{mm}/Add")
            )
        outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", weight.shape[0]])
        )
    keep = [o for o in g.output if o.name != HIDDEN]
    del g.output[:]
    g.output.extend(keep + outputs)


def mark_shared_cache(model, head_size: int) -> None:
    """Tell ``ptedge.decoding`` (through model metadata) to bind one cache buffer per layer."""
    from onnx import helper

    from ptedge.decoding import HEAD_SIZE, SHARED_CACHE

    helper.set_model_props(model, {SHARED_CACHE: "shared", HEAD_SIZE: str(head_size)})


def save(model, path: Path) -> None:
    """Write ``model`` to ``path`` with its weights in ``<name>.data`` beside it (a
    ``.data`` file left by an earlier graph at ``path`` is replaced: onnx appends to it)."""
    import onnx

    path.with_name(path.name + ".data").unlink(missing_ok=True)
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
