"""Causal-LM graphs from onnxruntime-genai's builder: task graphs and KV-cache decoders.

For a Llama-style backbone (``ptedge.export.builder.supports``) both kinds of ptedge
graph start from the builder's fused decoder instead of a TorchScript/optimum trace:

- ``build_task_graph``: built without its LM head (``exclude_lm_head``), prompt rows
  grafted in, cache inputs stripped, task heads at the slot added: the same inputs and
  outputs as ``ptedge.export.task_graph`` (``input_ids``, ``attention_mask``, ``slot`` ->
  ``scores.TASK``), so runtimes and clients are unchanged. SmolLM2-135M: 7,381 nodes
  (TorchScript) -> a few hundred;
- ``build_decoder``: built with its LM head (V outputs), prompt rows grafted in, marked
  for ``ptedge.decoding``'s shared cache buffers; onnxruntime-genai runs the same graph.

``precision`` is the builder's: fp32, or int8 / int4 (``MatMulNBits`` weights in blocks
of 32, activations quantized per block to int8 for the arithmetic, ``accuracy_level``
4; the LM head too, and a tied word embedding shares its int4/int8 table). The prompt
rows and the task heads stay float at every precision. ``quantize_guarded`` picks the
precision's recipe that keeps accuracy, as ``ptedge.export.quantize`` does for others;
for int8 task graphs it first tries ``int8-token`` (``smooth_int8``: integer MatMuls,
made from the fp32 task graph, about 2x faster than the builder's int8 at 40 tokens).
Measured on a SmolLM2 P36 generation prompt (107 dev facts, exact match, fp32 0.804):
int8 0.804; int4 0.645, with float arithmetic 0.654 (so the loss is the 4-bit weights,
not the int8 activations), asymmetric 0.664, k-quant 0.673, ``int4-mixed`` 0.776,
``int4-offset`` 0.794: this SmolLM2 comes from a Q4_1 GGUF, whose min-max 4-bit blocks
``int4-offset`` (``nbits_offset``) represents exactly, where the builder's integer zero
points re-round every weight.

Not responsible for: the builder environment (``builder``), graph edits
(``decoder_graph``), parity checks, bundle files, the genai folder (``genai``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ptedge.export import builder, decoder_graph, nbits_offset, smooth_int8
from ptedge.export.scoring import output_name
from ptedge.fuse import prompt_table

# recipes of each --quantize for builder graphs, tried in order by the guard:
# name -> (builder precision, extra options, edit of the built graph or None); "smooth"
# is made from the fp32 task graph instead (``smooth_int8``; task graphs only)
RECIPES = {
    "int8": {
        "int8-token": ("fp32", {}, "smooth"),
        "int8": ("int8", {"accuracy_level": "4"}, None),
        "int8-float": ("int8", {"accuracy_level": "1"}, None),
    },
    "int4": {
        "int4": ("int4", {"accuracy_level": "4"}, None),
        # the int8 graph's projections rewritten as 4-bit min-max blocks (nbits_offset)
        "int4-offset": ("int8", {"accuracy_level": "4"}, "offset"),
        "int4-offset-float": ("int8", {"accuracy_level": "1"}, "offset"),
        "int4-mixed": (
            "int4",
            {
                "accuracy_level": "4",
                "matmul_mixed_precision": "mixed_layers:int8,last_matmul:int8",
                "shared_embeddings": "false",
            },
            None,
        ),
    },
}
METHODS = {
    "fp32": "onnxruntime-genai builder, float32",
    "int8-token": "SmoothQuant (alpha 0.5, folded into the RMSNorm weights and up "
    "projections) then MatMulIntegerToFloat: 7-bit int8 weights with one scale per output "
    "column, uint8 activations with one scale per token computed in the graph; word embedding "
    "per-row int8; prompt rows and task heads float",
    "int8": "MatMulNBits 8-bit weights in blocks of 32 (LM head and tied embedding too), "
    "activations int8 per block (accuracy level 4); prompt rows and task heads float",
    "int8-float": "MatMulNBits 8-bit weights in blocks of 32, float arithmetic (accuracy "
    "level 1); prompt rows and task heads float",
    "int4": "MatMulNBits 4-bit weights in blocks of 32 (LM head and tied embedding too), "
    "activations int8 per block (accuracy level 4); prompt rows and task heads float",
    "int4-offset": "MatMulNBits 4-bit weights in blocks of 32 with a float offset per block "
    "(min-max, as GGUF's Q4_1; the offset applied as block sums of the activations times a "
    "small float matrix), activations int8 per block (accuracy level 4); LM head 8-bit, "
    "embedding float; prompt rows and task heads float",
    "int4-offset-float": "as int4-offset, with float arithmetic (accuracy level 1)",
    "int4-mixed": "MatMulNBits 4-bit weights in blocks of 32, 8-bit for the LM head and "
    "the most sensitive projections (llama.cpp's choice: qkv and down projections of the "
    "first and last eighth of the layers and every third layer), embedding float, "
    "activations int8 per block (accuracy level 4); prompt rows and task heads float",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def uses_builder(runs, dtype: str = "fp32") -> bool:
    """Whether these runs export through the builder: a backbone it takes, LM heads only
    (verbalizer, open vocabulary or generation), float32 (fp16 keeps the TorchScript path)."""
    cfg = runs[0].cfg
    return (
        dtype == "fp32"
        and cfg.causal
        and builder.supports(cfg.model)
        and all(r.cfg.head in ("lm", "generate") for r in runs)
    )


def _prompt_rows(runs) -> np.ndarray:
    """All tasks' prompt tables, one after another as their pseudo ids are (n, H)."""
    return np.concatenate([prompt_table(r.task.model).numpy() for r in runs]).astype(np.float32)


def _built(backbone: str, recipe: tuple, **options: str) -> tuple[object, dict]:
    precision, extra, edit = recipe
    out = builder.build(backbone, precision, {**extra, **options})
    config = json.loads((out / "genai_config.json").read_text())
    model = decoder_graph.load(out / "model.onnx")
    if edit == "offset":
        fp32 = decoder_graph.load(builder.build(backbone, "fp32", options) / "model.onnx")
        info = nbits_offset.rewrite(model, nbits_offset.float_weights(fp32))
        _log(
            f"int4 with offsets: {info['matmuls']} projections, largest weight error "
            f"{info['max_abs_error']:.2e} (largest weight {info['max_abs_weight']:.2f})"
        )
    return model, config


def build_task_graph(runs, path: Path, recipe: tuple = ("fp32", {}, None)) -> int:
    """Write the task graph of ``runs`` to ``path``; returns its node count."""
    model, _ = _built(runs[0].cfg.model, recipe, exclude_lm_head="true")
    decoder_graph.graft_prompt(model, _prompt_rows(runs), runs[0].cfg.vocab_size)
    decoder_graph.strip_cache(model)
    heads = []
    for r in runs:
        m = r.task.model
        weight = m.lm_head.weight.detach().float().numpy()  # (V, H)
        bias = m.lm_head.bias
        if m.label_ids.numel():
            idx = m.label_ids.numpy()
            weight = weight[idx]  # (L, H)
            bias = None if bias is None else bias[m.label_ids]
        heads.append((output_name(r.name), weight, None if bias is None else bias.detach().numpy()))
    decoder_graph.add_heads(model, heads)
    decoder_graph.save(model, path)
    return len(model.graph.node)


def build_decoder(run, path: Path, recipe: tuple = ("fp32", {}, None)) -> dict:
    """Write the KV-cache decoder of a generation run to ``path``; returns the builder's
    ``genai_config.json`` (for the genai folder) with the node count under ``nodes``."""
    model, config = _built(run.cfg.model, recipe)
    decoder_graph.graft_prompt(model, _prompt_rows([run]), run.cfg.vocab_size)
    decoder_graph.mark_shared_cache(model, config["model"]["decoder"]["head_size"])
    decoder_graph.save(model, path)
    return config | {"nodes": len(model.graph.node)}


def quantize_guarded(fp32: Path, out: Path, runs, args) -> dict:
    """The first recipe of ``RECIPES[args.quantize]`` whose graph keeps every task within
    ``args.max_drop`` points of the fp32 graph (``ptedge.export.guard``)."""
    from ptedge.export.guard import guard, guard_records
    from ptedge.export.quantize import calibration_feeds

    generative = runs[0].cfg.head == "generate"
    recipes = RECIPES[args.quantize]
    names = [n for n, r in recipes.items() if not (generative and r[2] == "smooth")]

    def write(name: str, data: dict) -> dict:
        recipe = recipes[name]
        facts = {}
        if recipe[2] == "smooth":
            feeds, sources = calibration_feeds(runs, data)
            facts = smooth_int8.write(fp32, out, feeds) | {"calibration": sources}
            nodes = facts.pop("graph_nodes")
        elif generative:
            nodes = build_decoder(runs[0], out, recipe)["nodes"]
        else:
            nodes = build_task_graph(runs, out, recipe)
        return {
            "recipe": name,
            "precision": args.quantize,
            "method": METHODS[name],
            "graph_nodes": nodes,
            **facts,
            "fp32_bytes": _size(fp32),
            "bytes": _size(out),
        }

    return guard(fp32, out, runs, args, names, write, guard_records(runs, args))


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
