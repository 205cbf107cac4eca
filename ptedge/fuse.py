"""Freeze and fuse: turn trained prompts into extra rows of the backbone's embedding.

After training, a PromptEncoder's output is a constant table (n, H). ``fuse`` appends
the tables of one or more tasks to a copy of the backbone's word-embedding matrix
(task t's pseudo token k gets id ``V + offset_t + k``), leaves the LM head at V
outputs (a pseudo token can never be predicted; tied heads are untied by giving the
input side its own matrix), and wraps the result as a *task graph*: a module that
maps ordinary ``input_ids`` to each task's scores at the answer slot, and nothing more.

Not responsible for: ONNX, quantization, bundle files (``ptedge.export``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ptedge.model import PTuningModel, mean_pool


@dataclass
class FusedTask:
    """One task inside a fused graph: its trained model and its pseudo-id offset."""

    name: str
    model: PTuningModel
    offset: int  # first pseudo id is V + offset


@torch.no_grad()
def prompt_table(model: PTuningModel) -> torch.Tensor:
    """The encoder's output in eval mode, shape (n_pseudo, H)."""
    was = model.encoder.training
    model.encoder.eval()
    table = model.encoder()[: model.encoder.n_pseudo].detach().clone()  # (n, H)
    model.encoder.train(was)
    return table


class _LabelHead(nn.Module):
    """The LM head restricted to a verbalizer's label ids: (B, H) -> (B, L)."""

    def __init__(self, lm_head: nn.Module, label_ids: torch.Tensor):
        super().__init__()
        if isinstance(lm_head, nn.Linear):
            self.transform: nn.Module = nn.Identity()
            decoder = lm_head
            bias = lm_head.bias
        elif hasattr(lm_head, "predictions"):  # BERT-style: transform, then tied decoder
            self.transform = lm_head.predictions.transform
            decoder = lm_head.predictions.decoder
            bias = lm_head.predictions.bias
        else:
            raise ValueError(f"unsupported LM head {type(lm_head).__name__}")
        self.proj = nn.Linear(decoder.in_features, len(label_ids), bias=bias is not None)
        self.proj.weight.data = decoder.weight.data[label_ids].clone()
        if bias is not None:
            self.proj.bias.data = bias.data[label_ids].clone()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.transform(h))  # (B, L)


class _LinearHead(nn.Module):
    """A trained linear classifier reading the slot, a mean over tokens or the pooler.

    ``vocab_size``: the backbone's own vocabulary; fused pseudo tokens have ids above it,
    which ``pool="text"`` leaves out of its mean.
    """

    def __init__(
        self, linear: nn.Linear, pool: str, vocab_size: int, pooler: nn.Module | None = None
    ):
        super().__init__()
        self.linear = copy.deepcopy(linear)
        self.pool = pool
        self.vocab_size = vocab_size
        self.pooler = copy.deepcopy(pooler) if pool == "pooler" else None

    def forward(self, at_slot, hidden, attention_mask, input_ids, slot):
        if self.pool == "mean":
            at_slot = mean_pool(hidden, attention_mask)  # (B, H)
        elif self.pool == "text":
            at_slot = mean_pool(hidden, attention_mask, input_ids, slot, self.vocab_size)
        elif self.pooler is not None:
            at_slot = self.pooler(hidden)  # (B, H)
        return self.linear(at_slot)  # (B, L)


class TaskGraph(nn.Module):
    """Fused backbone + per-task heads: (input_ids, attention_mask, slot) -> task scores.

    input_ids, attention_mask: (B, T) int64; slot: (B,) int64. Returns one tensor per
    task: (B, L) label scores, or (B, V) next-token/mask logits for open vocabulary.
    """

    def __init__(self, base: nn.Module, heads: nn.ModuleList, needs_hidden: list[bool]):
        super().__init__()
        self.base = base
        self.heads = heads
        self.needs_hidden = needs_hidden

    def forward(self, input_ids, attention_mask, slot):
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        at_slot = hidden[torch.arange(hidden.shape[0]), slot]  # (B, H)
        outs = []
        for head, full in zip(self.heads, self.needs_hidden, strict=True):
            outs.append(
                head(at_slot, hidden, attention_mask, input_ids, slot) if full else head(at_slot)
            )
        return tuple(outs)


def fuse(tasks: list[FusedTask]) -> TaskGraph:
    """Build the task graph for tasks that share one backbone (not modified)."""
    first = tasks[0].model
    base = copy.deepcopy(first.base)
    emb = base.get_input_embeddings()
    V, H = emb.weight.shape
    tables = [prompt_table(t.model) for t in tasks]
    total = sum(t.shape[0] for t in tables)
    fused = nn.Embedding(V + total, H, padding_idx=emb.padding_idx)
    with torch.no_grad():
        fused.weight[:V] = emb.weight
        for t, table in zip(tasks, tables, strict=True):
            fused.weight[V + t.offset : V + t.offset + table.shape[0]] = table
    base.set_input_embeddings(fused)  # the LM head keeps its own V-row matrix
    heads = nn.ModuleList()
    needs_hidden = []
    for t in tasks:
        m = t.model
        if m.head is not None:
            heads.append(_LinearHead(m.head, m.pool, V, getattr(m.base, "pooler", None)))
            needs_hidden.append(True)
        elif m.label_ids.numel():
            heads.append(_LabelHead(m.lm_head, m.label_ids))
            needs_hidden.append(False)
        else:
            heads.append(copy.deepcopy(m.lm_head))
            needs_hidden.append(False)
    graph = TaskGraph(base, heads, needs_hidden)
    graph.eval()
    graph.requires_grad_(False)
    return graph
