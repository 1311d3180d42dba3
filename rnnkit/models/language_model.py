"""Embedding -> stacked RNN -> linear softmax layer, optionally with tied weights."""
from __future__ import annotations

import torch
from torch import nn

from rnnkit.models.dropout import Dropout
from rnnkit.models.rnn import State, make_rnn


class RNNLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, cell: str, embedding_dim: int, hidden_size: int,
                 num_layers: int, dropout: float, tie_weights: bool, rnn_options: dict | None = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = make_rnn(cell, embedding_dim, hidden_size, num_layers, dropout, **(rnn_options or {}))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(hidden_size, embedding_dim) if tie_weights and embedding_dim != hidden_size else None
        self.output = nn.Linear(embedding_dim if tie_weights else hidden_size, vocab_size)
        if tie_weights:
            self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``tokens``: (batch, time) ids -> logits (batch, time, vocab) and the final state."""
        x = self.dropout(self.embedding(tokens))
        out, state = self.rnn(x, state)
        out = self.dropout(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.output(out), state
