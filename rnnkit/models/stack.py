"""A stacked, optionally bidirectional layer of the newer cells (minGRU, minLSTM, RG-LRU,
sLSTM, mLSTM), batch first, with a state of shape (layers * directions, B, S) like a GRU's:
S is the cell's ``state_size``, and the first H numbers of a state are the cell's output h
(for minGRU, minLSTM and RG-LRU that is all of it; xLSTM's cells carry their memory after
it). So every task, search and checkpoint sees the layer as it sees a GRU.

Each cell answers one interface:

- ``run(x, state, held, reverse)``: the parallel form over a whole padded sequence (a scan
  for the linear cells, chunks for mLSTM; sLSTM's is its step form in a loop) -> every
  output (B, T, H) and the final state (B, S); a padded position (``held``) never reaches
  a state;
- ``step(x, state)``: one position from a carried state -> output (N, H) and the new state;
- ``sequential(x, state)``: its paper's equations one position at a time (the definition
  the tests hold the other two forms to) -> outputs and final state;
- ``state_size`` and ``hidden_size``.

Options: dropout between layers (``locked``: one mask per sequence), ``residual`` (layers
above the first add their input) and ``layer_norm`` (each layer's input normalised first,
the pre-norm of the residual stacks these cells come from).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.models.blocks import MLSTMBlock, SLSTMBlock
from rnnkit.models.dropout import dropout, locked_dropout
from rnnkit.models.mingated import MinGRUCell, MinLSTMCell
from rnnkit.models.rglru import HawkBlock, RGLRUCell
from rnnkit.models.scan import widen
from rnnkit.models.xlstm import MLSTMCell, SLSTMCell

STACK_CELLS: dict[str, type[nn.Module]] = {"mingru": MinGRUCell, "minlstm": MinLSTMCell, "rglru": RGLRUCell,
                                           "slstm": SLSTMCell, "mlstm": MLSTMCell}
HEADED_CELLS = ("slstm", "mlstm")     # cells whose state is split into heads
CHRONO_CELLS = ("mingru", "minlstm")  # cells whose gates the chrono initialisation sets
# the block a cell's paper puts around it
BLOCKS: dict[str, type[nn.Module]] = {"rglru": HawkBlock, "mlstm": MLSTMBlock, "slstm": SLSTMBlock}


class CellStack(nn.Module):
    """``cell`` one of :data:`STACK_CELLS`; ``heads`` for sLSTM and mLSTM; ``block``: each
    layer is the block its paper puts around the cell (:data:`BLOCKS`); ``chrono``: minGRU's
    and minLSTM's chrono initialisation; the other arguments as for ``torch.nn.GRU``."""

    batch_first = True

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, bidirectional: bool = False, layer_norm: bool = False,
                 residual: bool = False, locked_dropout: bool = False, heads: int = 4, block: bool = False,
                 chrono: int = 0):
        super().__init__()
        if cell not in STACK_CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {tuple(STACK_CELLS)}")
        if block and cell not in BLOCKS:
            raise ValueError(f"no block is built for {cell}; blocks exist for {', '.join(BLOCKS)}")
        self.block = block
        self.cell, self.input_size, self.hidden_size, self.num_layers = cell, input_size, hidden_size, num_layers
        self.dropout = dropout if num_layers > 1 else 0.0
        self.bidirectional, self.directions = bidirectional, 2 if bidirectional else 1
        self.suffixes = ("", "_reverse")[: self.directions]     # each direction's module names
        self.layer_norm, self.residual, self.locked = layer_norm, residual, locked_dropout
        self.trace: dict[int, list[torch.Tensor]] | None = None   # see rnnkit.gradient_flow
        options = {"heads": heads} if cell in HEADED_CELLS else {}
        if chrono:
            options["chrono"] = chrono
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            if layer_norm:
                self.add_module(f"norm_l{layer}", nn.LayerNorm(width))
            for sfx in self.suffixes:
                kind = BLOCKS[cell] if block else STACK_CELLS[cell]
                self.add_module(f"cell_l{layer}{sfx}", kind(width, hidden_size, **options))
        self.state_size = self.cell_l0.state_size

    def extra_repr(self) -> str:
        extras = [k for k in ("layer_norm", "residual", "block") if getattr(self, k)]
        return ", ".join([self.cell, f"{self.input_size}, {self.hidden_size}", f"num_layers={self.num_layers}",
                          f"bidirectional={self.bidirectional}", *extras])

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The zero state (layers * directions, batch, S)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        return like.new_zeros(self.num_layers * self.directions, batch, self.state_size, dtype=dtype)

    def _between(self, out: torch.Tensor, inp: torch.Tensor, layer: int) -> torch.Tensor:
        """What the next layer reads: the residual sum and the dropout between layers."""
        if self.residual and layer > 0:
            out = out + inp
        if self.dropout and self.training and layer + 1 < self.num_layers:
            out = locked_dropout(out, self.dropout, True) if self.locked and out.dim() == 3 \
                else dropout(out, self.dropout, True)
        return out

    def _stepwise(self, cell: nn.Module, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
                  reverse: bool, trace: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The step form over a sequence, each state kept in ``trace`` (the gradient-flow
        probe needs every step's state in the graph)."""
        out = [None] * x.size(1)
        for t in (range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))):
            _, new = cell.step(x[:, t], state)
            state = new if held is None else torch.where(held[:, t], state, new)
            trace.append(state)
            out[t] = state[:, :self.hidden_size]
        return torch.stack(out, 1), state

    def forward(self, x: torch.Tensor | PackedSequence, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """``x`` (B, T, input) (with ``lengths`` (B,) when padded) or a PackedSequence, and
        ``state`` (layers * directions, B, S) -> outputs (B, T, directions * H) (zero on
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

        def direction(layer: int, d: int, cell: nn.Module, x: torch.Tensor, s0: torch.Tensor):
            if self.trace is not None and d == 0:
                return self._stepwise(cell, x, widen(s0), held, False, self.trace.setdefault(layer, []))
            return cell.run(x, widen(s0), held, d == 1)

        def after(out: torch.Tensor, inp: torch.Tensor, layer: int) -> torch.Tensor:
            return self._between(out if held is None else out.masked_fill(held, 0.0), inp, layer)

        x, final = self._walk(x, state, direction, after)
        if packed:
            return pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False), final
        return x, final

    def step(self, x: torch.Tensor, state: torch.Tensor, masks: list | None = None):
        """One position of a unidirectional layer: ``x`` (N, input), ``state`` (layers, N, S)
        -> the top layer's output (N, H) and the new state."""
        states = []
        for layer in range(self.num_layers):
            inp = x
            if self.layer_norm:
                x = getattr(self, f"norm_l{layer}")(x)
            h, new = getattr(self, f"cell_l{layer}").step(x, widen(state[layer]))
            states.append(new)
            x = self._between(h, inp, layer)
        return x, torch.stack(states) if len(states) > 1 else states[0].unsqueeze(0)

    def sequential(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stack from each cell's own equations, one position at a time (no
        padding, no dropout): the definition :meth:`forward` and :meth:`step` are tested against."""
        if state is None:
            state = self.initial_state(x.size(0), x)

        def direction(layer: int, d: int, cell: nn.Module, x: torch.Tensor, s0: torch.Tensor):
            if d == 0:
                return cell.sequential(x, s0)
            out, final = cell.sequential(x.flip(1), s0)
            return out.flip(1), final

        return self._walk(x, state, direction, lambda out, inp, layer: out + inp if self.residual and layer else out)

    def _walk(self, x: torch.Tensor, state: torch.Tensor, direction, after) -> tuple[torch.Tensor, torch.Tensor]:
        """Up the stack: ``direction(layer, d, cell, x, s0)`` gives one layer-direction's
        outputs (B, T, H) and final state, ``after(out, inp, layer)`` the next layer's input
        from the layer's output; returns the top's output and every layer-direction's final
        state (at each row's own end: padding holds the state)."""
        finals = []
        for layer in range(self.num_layers):
            inp = x
            if self.layer_norm:
                x = getattr(self, f"norm_l{layer}")(x)
            outs = []
            for d, sfx in enumerate(self.suffixes):
                out, final = direction(layer, d, getattr(self, f"cell_l{layer}{sfx}"), x,
                                       state[layer * self.directions + d])
                finals.append(final)
                outs.append(out)
            x = after(outs[0] if len(outs) == 1 else torch.cat(outs, -1), inp, layer)
        return x, torch.stack(finals)
