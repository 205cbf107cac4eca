"""PromptEncoder: the trainable module that produces the pseudo-token embeddings.

As in "GPT Understands, Too" (Liu et al. 2021): an embedding of the pseudo-token
count, a 2-layer bidirectional LSTM (H/2 per direction), then Linear-ReLU-Linear.
``mlp`` drops the LSTM; ``none`` trains the embeddings directly. Its output does not
depend on the input, which is why export can freeze it into a constant table.

Not responsible for: placing the embeddings in a sequence (``ptedge.model``).
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("lstm", "mlp", "none")


class PromptEncoder(nn.Module):
    def __init__(self, n_pseudo: int, hidden: int, kind: str = "lstm", dropout: float = 0.0):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"unknown encoder {kind!r}; choose one of {', '.join(ENCODERS)}")
        if kind == "lstm" and hidden % 2:
            raise ValueError(f"the lstm encoder needs an even hidden size, got {hidden}")
        self.kind = kind
        self.n_pseudo = n_pseudo
        self.embedding = nn.Embedding(max(n_pseudo, 1), hidden)
        self.lstm = (
            nn.LSTM(
                hidden,
                hidden // 2,
                num_layers=2,
                bidirectional=True,
                batch_first=True,
                dropout=dropout,
            )
            if kind == "lstm"
            else None
        )
        self.mlp = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            if kind != "none"
            else None
        )

    @torch.no_grad()
    def start_at(self, vector: torch.Tensor) -> None:
        """Make every pseudo token start as ``vector`` (H,): the last layer's weights start at
        zero and its bias at ``vector`` (``none``: each row is ``vector``). The first step's
        gradient reaches the last layer only; the tokens part from there."""
        if self.mlp is None:
            self.embedding.weight.copy_(vector.expand_as(self.embedding.weight))
            return
        last = self.mlp[-1]
        last.weight.zero_()
        last.bias.copy_(vector)

    def forward(self) -> torch.Tensor:
        """The prompt table, shape (n_pseudo, H)."""
        if self.n_pseudo == 0:
            return self.embedding.weight[:0]  # (0, H)
        x = self.embedding.weight[: self.n_pseudo].unsqueeze(0)  # (1, n, H)
        if self.lstm is not None:
            x = self.lstm(x)[0]  # (1, n, H)
        if self.mlp is not None:
            x = self.mlp(x)  # (1, n, H)
        return x.squeeze(0)  # (n, H)
