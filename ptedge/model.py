"""The training-time model: a frozen transformers backbone, a PromptEncoder and a head.

The forward pass looks up ordinary token embeddings, replaces pseudo-token positions
(ids ``V..V+n-1``) with the encoder's output, runs the frozen backbone on
``inputs_embeds`` and reads the answer at the slot:

- ``lm``: the backbone's own LM head at the slot, over the verbalizer's token ids, or
  over the whole vocabulary (open vocabulary, LAMA style);
- ``linear``: a trained ``Linear(H, n_labels)`` on the slot's hidden state (or the mean
  over the sequence with ``pool="mean"``, the mean over the record's own tokens, pseudo
  tokens and the slot left out, with ``pool="text"``, or the backbone's own pooler with
  ``pool="pooler"``, as BERT's sequence classifiers and PEFT adapters for them do), for
  backbones without an LM head.

Also here: loading a backbone folder and a run folder into this model. Not
responsible for: the training loop (``ptedge.train``), freezing/fusing for export
(``ptedge.fuse``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ptedge.config import RunConfig
from ptedge.prompt_encoder import PromptEncoder
from ptedge.template import compile_template, load_tokenizer

HEADS = ("lm", "linear", "generate")
POOLS = ("slot", "mean", "text", "pooler")


def mean_pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The mean (B, H) of hidden (B, T, H) over the attended positions of attention_mask
    (B, T); with input_ids (B, T), slot (B,) and vocab_size, over the record's own tokens
    only (``pool="text"``): pseudo tokens (ids >= vocab_size) and the slot are left out,
    the backbone's special tokens kept, as a sentence-transformers mean keeps them.
    """
    keep = attention_mask.bool()  # (B, T)
    if input_ids is not None:
        positions = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0)  # (1, T)
        keep = keep & (input_ids < vocab_size) & (positions != slot.unsqueeze(1))
    m = keep.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)


def load_backbone(path: str | Path) -> nn.Module:
    """Load a local transformers folder as the right Auto class, float32, eval, frozen."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(path)!r} is not a transformers folder")
    config = AutoConfig.from_pretrained(path)
    archs = " ".join(config.architectures or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        cls = AutoModelForCausalLM
    elif "MaskedLM" in archs:
        cls = AutoModelForMaskedLM
    else:
        cls = AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def split_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(base transformer, LM head module or None) of a transformers model."""
    base = model.base_model
    if base is model:
        return model, None
    heads = [m for _, m in model.named_children() if m is not base]
    if len(heads) != 1:
        raise ValueError(f"cannot find the LM head of {type(model).__name__}")
    return base, heads[0]


def is_causal(model: nn.Module) -> bool:
    return (
        bool(getattr(model.config, "is_decoder", False))
        or "CausalLM" in type(model).__name__
        or "LMHeadModel" in type(model).__name__
    )


def backbone_ids(model_dir: Path, model: nn.Module) -> tuple[int | None, int]:
    """(mask token id or None, pad id) for a backbone folder."""
    tok = load_tokenizer(model_dir)
    mask_id = None
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    mask_token = tok_cfg.get("mask_token")
    if isinstance(mask_token, dict):
        mask_token = mask_token.get("content")
    for name in (mask_token, "[MASK]", "<mask>"):
        if name and tok.token_to_id(name) is not None:
            mask_id = tok.token_to_id(name)
            break
    return mask_id, pad_id(model)


def pad_id(model: nn.Module) -> int:
    """The backbone's padding id from its config: pad, else eos (first of a list), else 0."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


def eos_id(model: nn.Module) -> int | None:
    """The backbone's end-of-sequence id (the first, if it lists several)."""
    eos = getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos


def backbone_hash(model_dir: Path) -> str:
    """sha256 over the backbone's config and weight files (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.suffix in (".json", ".safetensors", ".bin") and p.name != "ptedge-backbone.json":
            h.update(p.name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class PTuningModel(nn.Module):
    """Frozen backbone + PromptEncoder (+ linear head). Only encoder and head train."""

    def __init__(
        self,
        backbone: nn.Module,
        n_pseudo: int,
        *,
        head: str,
        encoder: str = "lstm",
        n_labels: int = 0,
        label_ids: list[int] | None = None,
        pool: str = "slot",
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        self.backbone = backbone.requires_grad_(False)
        self.base, self.lm_head = split_backbone(backbone)
        if head in ("lm", "generate") and self.lm_head is None:
            raise ValueError(
                f"head {head!r} needs a backbone with an LM head; "
                f"{type(backbone).__name__} has none (use --head linear)"
            )
        if pool == "pooler" and getattr(self.base, "pooler", None) is None:
            raise ValueError(f"pool 'pooler': {type(self.base).__name__} has no pooler")
        self.head_kind = head
        self.pool = pool
        self.backbone_dropout = False  # training may turn it on (defaults.backbone_dropout)
        emb = self.base.get_input_embeddings()
        self.vocab_size, hidden = emb.weight.shape
        self.encoder = PromptEncoder(n_pseudo, hidden, encoder)
        if encoder == "none" and n_pseudo:  # start free vectors at real word embeddings
            g = torch.Generator().manual_seed(0)
            rows = torch.randint(0, self.vocab_size, (n_pseudo,), generator=g)
            self.encoder.embedding.weight.data[:n_pseudo] = emb.weight.data[rows]
        self.head = nn.Linear(hidden, n_labels) if head == "linear" else None
        self.register_buffer(
            "label_ids",
            torch.tensor(label_ids if label_ids is not None else [], dtype=torch.long),
            persistent=False,
        )

    def train(self, mode: bool = True) -> PTuningModel:
        """Training mode for the prompt encoder and head; the frozen backbone's dropout
        follows ``backbone_dropout`` (off unless training turns it on)."""
        super().train(mode)
        if not self.backbone_dropout:
            self.backbone.eval()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids with pseudo ids >= V -> (B, T, H) embeddings."""
        V = self.vocab_size
        pseudo = input_ids >= V  # (B, T)
        words = self.base.get_input_embeddings()(input_ids.clamp(max=V - 1))  # (B, T, H)
        if not pseudo.any():
            return words
        table = self.encoder()  # (n, H)
        rows = (input_ids - V).clamp(min=0, max=table.shape[0] - 1)  # (B, T)
        # F.embedding, not table[rows]: on CPU with several threads the backward of advanced
        # indexing (index_put_ with accumulate) adds rows with atomics in a varying order,
        # so training did not repeat; embedding's backward sums each row in a fixed order.
        prompt = nn.functional.embedding(rows, table)  # (B, T, H)
        return torch.where(pseudo.unsqueeze(-1), prompt.to(words.dtype), words)

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None
    ) -> torch.Tensor:
        """Last hidden states (B, T, H) of the backbone on the prompted input."""
        kw = {} if position_ids is None else {"position_ids": position_ids}
        out = self.base(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, **kw)
        return out.last_hidden_state

    def target_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """LM logits (B, K, V) at ``positions`` (B, K): teacher forcing for ``generate``."""
        hidden = self.hidden(input_ids, attention_mask)  # (B, T, H)
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(picked)  # (B, K, V)

    @torch.inference_mode()
    def greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_id: int,
    ) -> list[list[int]]:
        """Greedy continuation of left-padded prompts (B, T); tokens up to eos, excluded.

        Recomputes the whole sequence each step (no cache): a reference for parity
        checks and evaluation, not a fast decoder.
        """
        ids, mask = input_ids, attention_mask
        out: list[list[int]] = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions ignore left padding
            last = self.hidden(ids, mask, pos)[:, -1]  # (B, H)
            nxt = self.lm_head(last).argmax(-1)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t == eos_id:
                        done[b] = True
                    else:
                        out[b].append(t)
            if done.all():
                break
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)  # (B, T+1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, T+1)
        return out

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        """The linear head's input (B, H), float32: the hidden state at ``slot``, the mean
        over the sequence or over the record's own tokens, or the backbone's pooler, as
        ``pool`` says.

        input_ids, attention_mask: (B, T); slot: (B,).
        """
        hidden = self.hidden(input_ids, attention_mask)  # (B, T, H)
        if self.pool == "mean":
            pooled = mean_pool(hidden, attention_mask)  # (B, H)
        elif self.pool == "text":
            pooled = mean_pool(hidden, attention_mask, input_ids, slot, self.vocab_size)
        elif self.pool == "pooler":  # e.g. BERT: tanh(dense(first token))
            pooled = self.base.pooler(hidden)  # (B, H)
        else:
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), slot]  # (B, H)
        return pooled.float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (B, L) over the labels, or (B, V) over the vocabulary.

        input_ids, attention_mask: (B, T); slot: (B,) position whose output is the answer.
        With ``positions`` (B, K): LM logits (B, K, V) there instead (``generate`` training).
        """
        if positions is not None:
            return self.target_logits(input_ids, attention_mask, positions)
        if self.head is not None:
            return self.head(self.features(input_ids, attention_mask, slot))  # (B, L)
        hidden = self.hidden(input_ids, attention_mask)  # (B, T, H)
        at_slot = hidden[torch.arange(hidden.shape[0], device=hidden.device), slot]  # (B, H)
        logits = self.lm_head(at_slot)  # (B, V)
        if self.label_ids.numel():
            return logits[:, self.label_ids]  # (B, L)
        return logits

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of what a run saves, by file: encoder (and head), never the backbone."""
        parts = {ENCODER_FILE: self.encoder}
        if self.head is not None:
            parts[HEAD_FILE] = self.head
        return {
            name: {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
            for name, m in parts.items()
        }

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.encoder.load_state_dict(state[ENCODER_FILE])
        if self.head is not None:
            self.head.load_state_dict(state[HEAD_FILE])

    def save_weights(self, run_dir: str | Path) -> None:
        """Write the trainable weights as safetensors files into ``run_dir``."""
        from safetensors.torch import save_file

        for name, tensors in self.trainable_state().items():
            save_file(tensors, str(Path(run_dir) / name))

    def load_weights(self, run_dir: str | Path) -> None:
        from safetensors.torch import load_file

        names = [ENCODER_FILE] + ([HEAD_FILE] if self.head is not None else [])
        self.load_trainable_state({n: load_file(str(Path(run_dir) / n)) for n in names})


ENCODER_FILE = "prompt_encoder.safetensors"
HEAD_FILE = "head.safetensors"
# the refitted head dev judged, when the one in HEAD_FILE was also fitted on the dev records
# carved from --train (``ptedge.train``); export calibrates on it (``ptedge.export.runs``)
HEAD_WITHOUT_DEV_FILE = "head.without_dev.safetensors"


def compile_for(
    model_dir: Path,
    backbone: nn.Module,
    template: str,
    *,
    causal: bool,
    max_length: int,
    pseudo_base: int = 0,
    peft_layout: bool = False,
):
    """(tokenizer, compiled template) of ``template`` for the backbone in ``model_dir``."""
    tok = load_tokenizer(model_dir)
    mask_id, pad_id = backbone_ids(model_dir, backbone)
    compiled = compile_template(
        template,
        tok,
        causal=causal,
        mask_id=mask_id,
        pad_id=pad_id,
        max_length=max_length,
        pseudo_base=pseudo_base,
        peft_layout=peft_layout,
    )
    return tok, compiled


def build_for_run(cfg: RunConfig, backbone: nn.Module | None = None):
    """(PTuningModel, tokenizer, compiled template, label ids) for a run's config."""
    from ptedge.template import answer_ids

    model_dir = Path(cfg.model)
    backbone = backbone if backbone is not None else load_backbone(model_dir)
    tok, compiled = compile_for(
        model_dir,
        backbone,
        cfg.template,
        causal=cfg.causal,
        max_length=cfg.max_length,
        pseudo_base=cfg.vocab_size,
        peft_layout=cfg.layout == "peft",
    )
    label_ids = None
    if cfg.head == "lm" and cfg.verbalizer:
        label_ids = answer_ids(compiled, tok, [cfg.verbalizer[lab] for lab in cfg.labels])
    model = PTuningModel(
        backbone,
        cfg.n_pseudo,
        head=cfg.head,
        encoder=cfg.encoder,
        n_labels=len(cfg.labels or []) if cfg.head == "linear" else 0,
        label_ids=label_ids,
        pool=cfg.pool,
    )
    return model, tok, compiled, label_ids


def load_run(run_dir: str | Path):
    """(cfg, model, tokenizer, compiled template, label ids) from a run folder."""
    cfg = RunConfig.load(run_dir)
    model, tok, compiled, label_ids = build_for_run(cfg)
    model.load_weights(run_dir)
    model.eval()
    return cfg, model, tok, compiled, label_ids
