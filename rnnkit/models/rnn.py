"""Recurrent layers built on ``torch.nn``'s fused implementations (cuDNN on GPU)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
CELLS: tuple[str, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
             dropout: float = 0.0, bidirectional: bool = False) -> nn.RNNBase:
    """A stacked batch-first recurrent layer; ``dropout`` applies between layers."""
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                  dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
                  batch_first=True)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(nonlinearity=cell[4:], **kwargs)
    raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")


State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried hidden state (truncated backpropagation through time)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
