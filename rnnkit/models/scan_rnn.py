"""A stacked, optionally bidirectional layer of the cells whose recurrence is linear in
their state (minGRU, minLSTM, RG-LRU): batch first, with the state shape of a GRU,
(layers * directions, B, H), so every task, search and checkpoint sees it as it sees a GRU.

Each cell answers the same interface: ``coefficients(x)`` gives a_t and b_t of
h_t = a_t h_(t-1) + b_t for any number of positions at once, and ``sequential(x, h)`` runs
its paper's equations one position at a time (the definition the tests check the other two
forms against). From the coefficients this layer builds:

- the parallel form (:meth:`ScanRNN.forward`): a whole padded sequence in one scan; a padded
  position gets a = 1 and b = 0, so it never reaches a state, and its output is zero;
- the step form (:meth:`ScanRNN.step`): one position from a carried state.

Options: dropout between layers (``locked``: one mask per sequence), ``residual`` (layers
above the first add their input) and ``layer_norm`` (each layer's input normalised first,
the pre-norm of the residual stacks these cells come from). The gates never read the
state, so there is no recurrent matrix for recurrent dropout or DropConnect to act on.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.models.dropout import dropout, locked_dropout
from rnnkit.models.mingated import MinGRUCell, MinLSTMCell
from rnnkit.models.rglru import RGLRUCell
from rnnkit.models.scan import linear_scan, widen

SCAN_CELLS: dict[str, type[nn.Module]] = {"mingru": MinGRUCell, "minlstm": MinLSTMCell, "rglru": RGLRUCell}


class ScanRNN(nn.Module):
    """``cell`` one of :data:`SCAN_CELLS`; the other arguments as for ``torch.nn.GRU``."""

    batch_first = True

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, bidirectional: bool = False, layer_norm: bool = False,
                 residual: bool = False, locked_dropout: bool = False):
        super().__init__()
        if cell not in SCAN_CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {tuple(SCAN_CELLS)}")
        self.cell, self.input_size, self.hidden_size, self.num_layers = cell, input_size, hidden_size, num_layers
        self.dropout = dropout if num_layers > 1 else 0.0
        self.bidirectional, self.directions = bidirectional, 2 if bidirectional else 1
        self.suffixes = ("", "_reverse")[: self.directions]     # each direction's module names
        self.layer_norm, self.residual, self.locked = layer_norm, residual, locked_dropout
        self.trace: dict[int, list[torch.Tensor]] | None = None   # see rnnkit.gradient_flow
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            if layer_norm:
                self.add_module(f"norm_l{layer}", nn.LayerNorm(width))
            for sfx in self.suffixes:
                self.add_module(f"cell_l{layer}{sfx}", SCAN_CELLS[cell](width, hidden_size))

    def extra_repr(self) -> str:
        extras = [k for k in ("layer_norm", "residual") if getattr(self, k)]
        return ", ".join([self.cell, f"{self.input_size}, {self.hidden_size}", f"num_layers={self.num_layers}",
                          f"bidirectional={self.bidirectional}", *extras])

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The zero state (layers * directions, batch, H)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        return like.new_zeros(self.num_layers * self.directions, batch, self.hidden_size, dtype=dtype)

    def _between(self, out: torch.Tensor, inp: torch.Tensor, layer: int) -> torch.Tensor:
        """What the next layer reads: the residual sum and the dropout between layers."""
        if self.residual and layer > 0:
            out = out + inp
        if self.dropout and self.training and layer + 1 < self.num_layers:
            out = locked_dropout(out, self.dropout, True) if self.locked and out.dim() == 3 \
                else dropout(out, self.dropout, True)
        return out

    def _run(self, cell: nn.Module, x: torch.Tensor, h0: torch.Tensor, held: torch.Tensor | None,
             reverse: bool, trace: list | None) -> torch.Tensor:
        """One layer-direction over (B, T, input) -> every state (B, T, H). A padded position
        (``held``) gets a = 1 and b = 0: the state passes it unchanged."""
        a, b = cell.coefficients(x)
        if held is not None:
            a, b = a.masked_fill(held, 1.0), b.masked_fill(held, 0.0)
        if trace is None:
            return linear_scan(a, b, h0, reverse)
        # the gradient-flow probe needs each step's state in the graph: the recurrence step by step
        h, out = h0, [None] * x.size(1)
        for t in (range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))):
            h = a[:, t] * h + b[:, t]
            trace.append(h)
            out[t] = h
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor | PackedSequence, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """``x`` (B, T, input) (with ``lengths`` (B,) when padded) or a PackedSequence, and
        ``state`` (layers * directions, B, H) -> outputs (B, T, directions * H) (zero on
        padding; packed if ``x`` was) and the final state, each row's at its own end."""
        packed = isinstance(x, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(x, batch_first=True)
        batch, steps = x.size(0), x.size(1)
        held = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            held = (torch.arange(steps, device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)).unsqueeze(-1)
        if state is None:
            state = self.initial_state(batch, x)

        def direction(layer: int, d: int, cell: nn.Module, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
            trace = self.trace.setdefault(layer, []) if self.trace is not None and d == 0 else None
            return self._run(cell, x, widen(h0), held, d == 1, trace)

        def after(out: torch.Tensor, inp: torch.Tensor, layer: int) -> torch.Tensor:
            return self._between(out if held is None else out.masked_fill(held, 0.0), inp, layer)

        x, final = self._walk(x, state, direction, after)
        if packed:
            return pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False), final
        return x, final

    def step(self, x: torch.Tensor, state: torch.Tensor, masks: list | None = None):
        """One position of a unidirectional layer: ``x`` (N, input), ``state`` (layers, N, H)
        -> the top layer's output (N, H) and the new state."""
        hs = []
        for layer in range(self.num_layers):
            inp = x
            if self.layer_norm:
                x = getattr(self, f"norm_l{layer}")(x)
            a, b = getattr(self, f"cell_l{layer}").coefficients(x)
            h = torch.addcmul(b, a, widen(state[layer]))
            hs.append(h)
            x = self._between(h, inp, layer)
        return x, torch.stack(hs)

    def sequential(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stack from each cell's own equations, one position at a time (no
        padding, no dropout): the definition :meth:`forward` and :meth:`step` are tested against."""
        if state is None:
            state = self.initial_state(x.size(0), x)

        def direction(layer: int, d: int, cell: nn.Module, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
            return cell.sequential(x.flip(1), h0).flip(1) if d == 1 else cell.sequential(x, h0)

        return self._walk(x, state, direction, lambda out, inp, layer: out + inp if self.residual and layer else out)

    def _walk(self, x: torch.Tensor, state: torch.Tensor, direction, after) -> tuple[torch.Tensor, torch.Tensor]:
        """Up the stack: ``direction(layer, d, cell, x, h0)`` gives one layer-direction's states
        (B, T, H), ``after(out, inp, layer)`` the next layer's input from the layer's output;
        returns the top's output and every layer-direction's final state (its state at the
        sequence's end: padding holds the state, so the end is each row's own end)."""
        finals = []
        for layer in range(self.num_layers):
            inp = x
            if self.layer_norm:
                x = getattr(self, f"norm_l{layer}")(x)
            outs = []
            for d, sfx in enumerate(self.suffixes):
                h = direction(layer, d, getattr(self, f"cell_l{layer}{sfx}"), x, state[layer * self.directions + d])
                finals.append(h[:, 0] if d == 1 else h[:, -1])
                outs.append(h)
            x = after(outs[0] if len(outs) == 1 else torch.cat(outs, -1), inp, layer)
        return x, torch.stack(finals)
