"""Recurrent layers built on ``torch.nn``'s fused implementations (cuDNN on GPU).

Whole sequences go through the fused layer in one call. Loops over time (input feeding,
scheduled sampling, search) advance one step with :func:`rnn_step`, which runs the same
weights through the single-step cell kernels: a fused layer called on one time step pays
its set-up (on CPU, oneDNN re-lays the weights out) at every step.
"""
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

_CELL_FNS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
             "RNN_RELU": torch.rnn_relu_cell}


def rnn_step(rnn: nn.RNNBase, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """One time step of a unidirectional ``rnn`` made by :func:`make_rnn`, exactly as
    ``rnn(x.unsqueeze(1), state)`` computes it: ``x`` (N, input) and ``state`` (layers, N, H)
    (an (h, c) pair for LSTMs) -> top layer's output (N, H) and the new state."""
    cell = _CELL_FNS[rnn.mode]
    lstm = rnn.mode == "LSTM"
    hs, cs = [], []
    for layer in range(rnn.num_layers):
        weights = [getattr(rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if lstm:
            h, c = cell(x, (state[0][layer], state[1][layer]), *weights)
            cs.append(c)
        else:
            h = cell(x, state[layer], *weights)
        hs.append(h)
        x = h
        if rnn.dropout and rnn.training and layer + 1 < rnn.num_layers:
            x = nn.functional.dropout(x, rnn.dropout, training=True)
    new = (torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs)
    return hs[-1], new


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried hidden state (truncated backpropagation through time)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
