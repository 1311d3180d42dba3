"""Attention over encoder states: dot, general (bilinear) and additive (Bahdanau), with one
head (Luong's and Bahdanau's decoders) or several (Vaswani et al.; the RNMT+ decoder).

Keys are prepared once per source batch (:meth:`Attention.keys`), so each decoder step
only scores its query against them. Padded source positions get zero weight.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def make_attention(kind: str, query_size: int, memory_size: int, heads: int = 1) -> nn.Module:
    """One head: :class:`Attention` (no projection of its own beyond what the score needs);
    several: :class:`MultiHeadAttention`."""
    if heads == 1:
        return Attention(kind, query_size, memory_size)
    return MultiHeadAttention(kind, query_size, memory_size, heads)


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


class MultiHeadAttention(nn.Module):
    """``heads`` attentions of one score side by side, each over its slice of projected
    queries, keys and values; their contexts concatenated and projected.

    Queries and keys are projected to the query's width ``d`` and cut into ``heads`` slices
    of ``d / heads``; values stay the memory's width ``M``, cut into ``M / heads``. Scores
    per head: ``dot`` is the scaled dot product, ``general`` puts a learned matrix of its own
    between each head's query and key, ``additive`` has a vector ``v`` of its own. The
    projected keys and values are prepared together once per source (:meth:`keys`). Weights
    come back per head: (B, T, heads, S)."""

    def __init__(self, kind: str, query_size: int, memory_size: int, heads: int):
        super().__init__()
        if kind not in ("dot", "general", "additive"):
            raise ValueError(f"unknown attention {kind!r}")
        for name, size in (("query", query_size), ("memory", memory_size)):
            if size % heads:
                raise ValueError(f"{heads} heads do not divide the {name} size {size}")
        self.kind, self.heads = kind, heads
        self.key_size, self.memory_size = query_size, memory_size
        self.head_size = query_size // heads
        self.query_proj = nn.Linear(query_size, query_size, bias=kind == "additive")
        self.key_proj = nn.Linear(memory_size, query_size, bias=False)
        self.value_proj = nn.Linear(memory_size, memory_size, bias=False)
        self.out_proj = nn.Linear(memory_size, memory_size, bias=False)
        if kind == "general":     # starts as the identity: the scaled dot product of the projections
            self.bilinear = nn.Parameter(torch.eye(self.head_size).repeat(heads, 1, 1))
        elif kind == "additive":
            self.v = nn.Parameter(torch.empty(heads, self.head_size).uniform_(-1, 1) / math.sqrt(self.head_size))

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Projected keys (with each head's bilinear matrix applied) and values, side by side:
        (B, S, d + M)."""
        b, s, _ = memory.shape
        k = self.key_proj(memory)
        if self.kind == "general":
            k = torch.einsum("bshe,hde->bshd", k.view(b, s, self.heads, self.head_size), self.bilinear).reshape(b, s, -1)
        return torch.cat([k, self.value_proj(memory)], -1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` (B, T, Q) -> context (B, T, M) and weights (B, T, heads, S)."""
        b, t, _ = query.shape
        s, h = keys.size(1), self.heads
        k, v = keys.split([self.key_size, self.memory_size], -1)
        q = self.query_proj(query).view(b, t, h, self.head_size)
        k = k.reshape(b, s, h, self.head_size)
        if self.kind == "additive":
            scores = torch.einsum("btshd,hd->bhts", torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)), self.v)
        else:
            scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_size)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)                                  # (B, heads, T, S)
        values = v.reshape(b, s, h, -1).transpose(1, 2)                          # (B, heads, S, M / heads)
        context = torch.matmul(weights, values).transpose(1, 2).reshape(b, t, self.memory_size)
        return self.out_proj(context), weights.transpose(1, 2)
