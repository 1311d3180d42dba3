"""Recurrent layers written from their equations, with what the fused kernels cannot do.

:class:`ExplicitRNN` is a drop-in for ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (batch first): the
same call, the same outputs and the same parameter names and shapes (``weight_ih_l0``,
``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``), so a checkpoint moves
between the two implementations with its weights. For input x_t and previous state h, c
(W, b: the layer's weights and biases; gates in torch.nn's order):

    rnn_tanh:  h' = tanh(W_ih x_t + b_ih + W_hh h + b_hh)            (rnn_relu: relu)
    lstm:      i, f, g, o = W_ih x_t + b_ih + W_hh h + b_hh
               c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
               h' = sigmoid(o) * tanh(c')
    gru:       r, z, n_x = W_ih x_t + b_ih ;  r_h, z_h, n_h = W_hh h + b_hh
               r = sigmoid(r + r_h) ;  z = sigmoid(z + z_h)
               n = tanh(n_x + r * n_h) ;  h' = (1 - z) * n + z * h

On top:

- ``layer_norm`` (Ba et al. 2016, as in their LSTM equations): W_ih x_t and W_hh h are
  each layer-normalised over all their gate units, with a learned gain per unit
  (``ln_ih_l0``, ``ln_hh_l0``), before the biases are added; an LSTM also normalises c'
  before its tanh (``ln_c_weight_l0``, ``ln_c_bias_l0``).
- ``recurrent_dropout`` (Gal and Ghahramani 2016): in training, the state entering W_hh h
  is multiplied by one dropout mask per sequence, the same at every time step.
- ``residual``: layers above the first add their input to their output (equal widths).

The input projections W_ih x_t of a whole sequence are one matrix product; each time step
is one more (W_hh h) and a few element-wise operations. Packed batches are processed the
way cuDNN does: at step t only the sequences still running take part, so the final state
of every sequence is the state at its own last token.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.models.dropout import dropout, dropout_mask

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
MODES = {"rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU", "lstm": "LSTM", "gru": "GRU"}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class _Layer(NamedTuple):
    w_ih: torch.Tensor
    w_hh: torch.Tensor                 # detached when its gradient is deferred
    b_ih: torch.Tensor
    b_hh: torch.Tensor
    ln: tuple | None                   # (gain ih, gain hh, c weight, c bias) with layer norm
    zeros: torch.Tensor | None         # the deferred gradient's hook, (rows, G*H)
    inputs: list | None                # the states W_hh multiplied, row by row, for that gradient


class _DeferredWeightGrad(torch.autograd.Function):
    """W_hh's gradient for a whole sequence in one matrix product.

    Left to autograd, every time step adds its own small outer product (G*H x N times N x H)
    to W_hh's gradient. Instead the loop multiplies by a detached W_hh and adds these zeros
    (rows, G*H) to the products W_hh h; their gradient is then each step's gradient with
    respect to W_hh h, and once all have arrived it becomes dW_hh = dZ^T [h_1; ...; h_T] in
    a single product over the states the loop recorded in ``inputs``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: int, inputs: list) -> torch.Tensor:
        ctx.inputs = inputs
        return weight.new_zeros(rows, weight.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        states = torch.cat(ctx.inputs)
        ctx.inputs = None
        return grad.t().mm(states.to(grad.dtype)), None, None


def _norm(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Layer norm over the last dimension, with a learned gain (and a bias) per unit."""
    return F.layer_norm(x, x.shape[-1:], gain, bias)


class ExplicitRNN(nn.Module):
    """A stacked, optionally bidirectional recurrent layer (batch first) built from its equations."""

    batch_first = True

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, bidirectional: bool = False, layer_norm: bool = False,
                 recurrent_dropout: float = 0.0, residual: bool = False):
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"unknown cell {cell!r}; expected one of {tuple(GATES)}")
        self.cell, self.mode = cell, MODES[cell]
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout = dropout if num_layers > 1 else 0.0
        self.bidirectional = bidirectional
        self.directions = 2 if bidirectional else 1
        self.layer_norm, self.recurrent_dropout, self.residual = layer_norm, recurrent_dropout, residual
        self.trace: dict[int, list[torch.Tensor]] | None = None   # see rnnkit.gradient_flow
        g = GATES[cell] * hidden_size
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            for sfx in self._suffixes(layer):
                self.register_parameter(f"weight_ih{sfx}", nn.Parameter(torch.empty(g, width)))
                self.register_parameter(f"weight_hh{sfx}", nn.Parameter(torch.empty(g, hidden_size)))
                self.register_parameter(f"bias_ih{sfx}", nn.Parameter(torch.empty(g)))
                self.register_parameter(f"bias_hh{sfx}", nn.Parameter(torch.empty(g)))
                if layer_norm:
                    self.register_parameter(f"ln_ih{sfx}", nn.Parameter(torch.ones(g)))
                    self.register_parameter(f"ln_hh{sfx}", nn.Parameter(torch.ones(g)))
                    if cell == "lstm":
                        self.register_parameter(f"ln_c_weight{sfx}", nn.Parameter(torch.ones(hidden_size)))
                        self.register_parameter(f"ln_c_bias{sfx}", nn.Parameter(torch.zeros(hidden_size)))
        self.reset_parameters()

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.directions]

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if not name.startswith("ln_"):
                nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        extras = [f"{k}={getattr(self, k)}" for k in ("layer_norm", "recurrent_dropout", "residual")
                  if getattr(self, k)]
        return ", ".join([f"{self.cell}", f"{self.input_size}, {self.hidden_size}",
                          f"num_layers={self.num_layers}", f"bidirectional={self.bidirectional}"] + extras)

    # ------------------------------------------------------------------ one layer, one direction
    def _params(self, sfx: str, rows: int = 0) -> _Layer:
        """One layer-direction's weights. With ``rows`` (the positions of a whole sequence, in
        training) W_hh's gradient is deferred: see :class:`_DeferredWeightGrad`."""
        get = lambda name: getattr(self, name + sfx)  # noqa: E731
        lstm = self.cell == "lstm"
        ln = (get("ln_ih"), get("ln_hh"), get("ln_c_weight") if lstm else None,
              get("ln_c_bias") if lstm else None) if self.layer_norm else None
        w_hh, zeros, inputs = get("weight_hh"), None, None
        if rows and w_hh.requires_grad and torch.is_grad_enabled():
            inputs = []
            zeros = _DeferredWeightGrad.apply(w_hh, rows, inputs)
            w_hh = w_hh.detach()
        return _Layer(get("weight_ih"), w_hh, get("bias_ih"), get("bias_hh"), ln, zeros, inputs)

    def _input_projection(self, x: torch.Tensor, p: _Layer) -> torch.Tensor:
        """W_ih x (+ the biases that can be folded in) for any number of positions at once."""
        bias = p.b_ih if self.cell == "gru" else p.b_ih + p.b_hh
        if p.ln is None:
            return F.linear(x, p.w_ih, bias)
        return _norm(F.linear(x, p.w_ih), p.ln[0], bias)

    def _cell(self, gi: torch.Tensor, state: State, p: _Layer, mask: torch.Tensor | None,
              zeros: torch.Tensor | None) -> State:
        """One time step from the input projection ``gi`` (N, G*H). ``zeros`` (N, G*H) is
        added to W_hh h (the deferred-gradient hook) where it is not already in ``gi``."""
        h = state[0] if self.cell == "lstm" else state
        hr = h if mask is None else h * mask
        if p.inputs is not None:
            p.inputs.append(hr.detach())
        if self.cell == "gru":
            gh = F.linear(hr, p.w_hh) if zeros is None else torch.addmm(zeros, hr, p.w_hh.t())
            gh = gh + p.b_hh if p.ln is None else _norm(gh, p.ln[1], p.b_hh)
            r_x, z_x, n_x = gi.chunk(3, 1)
            r_h, z_h, n_h = gh.chunk(3, 1)
            r = torch.sigmoid(r_x + r_h)
            z = torch.sigmoid(z_x + z_h)
            n = torch.tanh(n_x + r * n_h)
            return n + z * (h - n)
        if p.ln is None:
            gates = torch.addmm(gi, hr, p.w_hh.t())
        else:
            gh = F.linear(hr, p.w_hh) if zeros is None else torch.addmm(zeros, hr, p.w_hh.t())
            gates = gi + _norm(gh, p.ln[1])
        if self.cell == "rnn_tanh":
            return torch.tanh(gates)
        if self.cell == "rnn_relu":
            return torch.relu(gates)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        c_out = c if p.ln is None else F.layer_norm(c, c.shape[-1:], p.ln[2], p.ln[3])
        return torch.sigmoid(o) * torch.tanh(c_out), c

    def _masks(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """One recurrent-dropout mask per sequence (training only)."""
        p = self.recurrent_dropout
        if not self.training or p <= 0:
            return None
        return dropout_mask((batch, self.hidden_size), p, like)

    def _run(self, x: torch.Tensor, sizes: list[int], state: State, sfx: str, reverse: bool,
             trace: list | None) -> tuple[list[torch.Tensor], State]:
        """Run one direction over time-major positions ``x`` (sum(sizes), input): step t owns
        the next sizes[t] rows, the first sizes[t] sequences (sorted longest first). Returns
        the outputs per step and each sequence's final state."""
        lstm = self.cell == "lstm"
        p = self._params(sfx, rows=x.size(0))
        gi = self._input_projection(x, p)
        zeros = p.zeros
        if zeros is not None and p.ln is None and self.cell != "gru":   # W_hh h is added to gi as it is
            gi, zeros = gi + zeros, None
        per_step = gi.split(sizes)   # one backward node for all steps (slicing would make one each)
        per_zeros = zeros.split(sizes) if zeros is not None else [None] * len(sizes)
        mask = self._masks(sizes[0], gi)
        order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
        outs: list[torch.Tensor] = [None] * len(sizes)  # type: ignore[list-item]
        full = state
        if reverse:   # sequences join as their own last token comes up, from their initial state
            state = tuple(s[: sizes[-1]] for s in full) if lstm else full[: sizes[-1]]
        finals: list[State] = []
        for t in order:
            n = sizes[t]
            rows = state[0].size(0) if lstm else state.size(0)
            if n < rows:       # forward: sequences that ended keep their state
                finals.append(tuple(s[n:] for s in state) if lstm else state[n:])
                state = tuple(s[:n] for s in state) if lstm else state[:n]
            elif n > rows:     # reverse: more sequences start here
                state = tuple(torch.cat([s, f[rows:n]]) for s, f in zip(state, full)) if lstm \
                    else torch.cat([state, full[rows:n]])
            state = self._cell(per_step[t], state, p, None if mask is None else mask[:n], per_zeros[t])
            h = state[0] if lstm else state
            outs[t] = h
            if trace is not None:
                trace.append(h)
        if p.inputs is not None and reverse:   # the deferred gradient reads them in row order
            p.inputs.reverse()
        finals.append(state)
        if lstm:
            final = (torch.cat([f[0] for f in reversed(finals)]), torch.cat([f[1] for f in reversed(finals)]))
        else:
            final = torch.cat(list(reversed(finals)))
        return outs, final

    # ------------------------------------------------------------------ the layer
    def forward(self, x: torch.Tensor | PackedSequence, state: State | None = None):
        """``x`` (B, T, input) or a PackedSequence; ``state`` (layers * directions, B, H) (an
        (h, c) pair for LSTMs) -> outputs (B, T, directions * H) or packed, and the final state."""
        packed = isinstance(x, PackedSequence)
        if packed:
            data, sizes = x.data, x.batch_sizes.tolist()
            batch = sizes[0]
        else:
            batch, steps = x.size(0), x.size(1)
            data, sizes = x.transpose(0, 1).reshape(batch * steps, -1), [batch] * steps
        lstm = self.cell == "lstm"
        if state is None:
            zeros = data.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            state = (zeros, zeros) if lstm else zeros
        elif packed and x.sorted_indices is not None:   # to the packed (longest-first) order
            state = tuple(s.index_select(1, x.sorted_indices) for s in state) if lstm \
                else state.index_select(1, x.sorted_indices)
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes(layer)):
                k = layer * self.directions + d
                init = (state[0][k], state[1][k]) if lstm else state[k]
                trace = self.trace.setdefault(layer, []) if self.trace is not None and d == 0 else None
                steps_out, final = self._run(data, sizes, init, sfx, d == 1, trace)
                outs.append(torch.cat(steps_out))
                hs.append(final[0] if lstm else final)
                if lstm:
                    cs.append(final[1])
            out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.residual and layer > 0:
                out = out + data
            if self.dropout and self.training and layer + 1 < self.num_layers:
                out = dropout(out, self.dropout, training=True)
            data = out
        final = (torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs)
        if packed:
            if x.unsorted_indices is not None:
                final = tuple(s.index_select(1, x.unsorted_indices) for s in final) if lstm \
                    else final.index_select(1, x.unsorted_indices)
            return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), final
        return data.view(steps, batch, -1).transpose(0, 1).contiguous(), final

    def step_masks(self, batch: int, like: torch.Tensor) -> list[torch.Tensor] | None:
        """Recurrent-dropout masks for a loop of :meth:`step` calls over one sequence."""
        if not self.training or self.recurrent_dropout <= 0:
            return None
        return [self._masks(batch, like) for _ in range(self.num_layers)]

    def step(self, x: torch.Tensor, state: State, masks: list[torch.Tensor] | None = None):
        """One time step of a unidirectional layer: ``x`` (N, input), ``state`` (layers, N, H)
        -> the top layer's output (N, H) and the new state."""
        lstm = self.cell == "lstm"
        hs, cs = [], []
        for layer in range(self.num_layers):
            p = self._params(f"_l{layer}")
            prev = (state[0][layer], state[1][layer]) if lstm else state[layer]
            new = self._cell(self._input_projection(x, p), prev, p, None if masks is None else masks[layer], None)
            h = new[0] if lstm else new
            hs.append(h)
            if lstm:
                cs.append(new[1])
            out = h + x if self.residual and layer > 0 else h
            if self.dropout and self.training and layer + 1 < self.num_layers:
                out = dropout(out, self.dropout, training=True)
            x = out
        return x, ((torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs))
