"""Attention over encoder states: dot, general (bilinear) and additive (Bahdanau).

Keys are prepared once per source batch (:meth:`Attention.keys`), so each decoder step
only scores its query against them. Padded source positions get zero weight.
"""
from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, kind: str, query_size: int, memory_size: int, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "dot" and query_size != memory_size:
            raise ValueError(f"dot attention needs equal sizes, got query {query_size} and memory {memory_size}")
        if kind == "general":
            self.key_proj = nn.Linear(memory_size, query_size, bias=False)
        elif kind == "additive":
            hidden = hidden or query_size
            self.key_proj = nn.Linear(memory_size, hidden, bias=False)
            self.query_proj = nn.Linear(query_size, hidden, bias=True)
            self.v = nn.Linear(hidden, 1, bias=False)
        elif kind != "dot":
            raise ValueError(f"unknown attention {kind!r}")

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Precompute what scoring needs from the encoder states (B, S, M)."""
        return memory if self.kind == "dot" else self.key_proj(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` (B, T, Q) -> context (B, T, M) and weights (B, T, S); ``mask`` (B, S) is True on real tokens."""
        if self.kind == "additive":
            scores = self.v(torch.tanh(self.query_proj(query).unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights, memory), weights
