"""Recurrent layers: ``torch.nn``'s fused implementations (cuDNN on GPU) or the explicit
cells of :mod:`rnnkit.models.cells`, which share their parameter names and add layer
norm, recurrent dropout and residual connections.

Whole sequences go through the layer in one call. Loops over time (input feeding,
scheduled sampling, search) advance one step with :func:`rnn_step`, which runs the same
weights through the single-step cell kernels: a fused layer called on one time step pays
its set-up (on CPU, oneDNN re-lays the weights out) at every step.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rnnkit.models.cells import ExplicitRNN

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
CELLS: tuple[str, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
             dropout: float = 0.0, bidirectional: bool = False, impl: str = "fused",
             layer_norm: bool = False, recurrent_dropout: float = 0.0, residual: bool = False) -> nn.Module:
    """A stacked batch-first recurrent layer; ``dropout`` applies between layers. ``impl``
    ``explicit`` builds it from its equations, which the last three options need."""
    if impl == "explicit":
        return ExplicitRNN(cell, input_size, hidden_size, num_layers, dropout, bidirectional,
                           layer_norm, recurrent_dropout, residual)
    if layer_norm or recurrent_dropout or residual:
        raise ValueError("layer_norm, recurrent_dropout and residual need impl='explicit'")
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


def rnn_step(rnn: nn.Module, x: torch.Tensor, state: State,
             masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
    """One time step of a unidirectional ``rnn`` made by :func:`make_rnn`, exactly as
    ``rnn(x.unsqueeze(1), state)`` computes it: ``x`` (N, input) and ``state`` (layers, N, H)
    (an (h, c) pair for LSTMs) -> top layer's output (N, H) and the new state. ``masks``:
    an explicit layer's recurrent-dropout masks for the sequence (:func:`step_masks`)."""
    if isinstance(rnn, ExplicitRNN):
        return rnn.step(x, state, masks)
    if not isinstance(rnn, nn.RNNBase):     # a quantised layer (``--int8``): its own kernels, one step long
        out, new = rnn(x.unsqueeze(1), state)
        return out[:, 0], new
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


def step_masks(rnn: nn.Module, batch: int, like: torch.Tensor) -> list[torch.Tensor] | None:
    """Recurrent-dropout masks held fixed over a loop of :func:`rnn_step` calls (None if unused)."""
    return rnn.step_masks(batch, like) if isinstance(rnn, ExplicitRNN) else None


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried hidden state (truncated backpropagation through time)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
