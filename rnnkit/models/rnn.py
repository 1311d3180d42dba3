"""Recurrent layers: ``torch.nn``'s fused implementations (cuDNN on GPU) or the explicit
cells of :mod:`rnnkit.models.cells`, which share their parameter names and add layer
norm, recurrent dropout and residual connections.

Whole sequences go through the layer in one call; padded batches of different lengths
through :func:`run_padded`, as if packed. Loops over time (input feeding, scheduled
sampling, search) advance one step with :func:`rnn_step`, which runs the same weights
through the single-step cell kernels: a fused layer called on one time step pays its
set-up (on CPU, oneDNN re-lays the weights out) at every step. A fused LSTM whose step
inputs are mostly known ahead (a decoder's words, with input feeding) steps faster with
:class:`LSTMSteps`.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.models.cells import ExplicitRNN
from rnnkit.models.dropout import dropout, dropout_mask, locked_dropout
from rnnkit.models.products import dense, grad_input
from rnnkit.models.stack import CHRONO_CELLS, STACK_CELLS, CellStack

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru", "mingru", "minlstm", "rglru", "slstm", "mlstm"]
CLASSIC_CELLS: tuple[str, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")
CELLS: tuple[str, ...] = CLASSIC_CELLS + tuple(STACK_CELLS)


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
             dropout: float = 0.0, bidirectional: bool = False, impl: str = "fused",
             layer_norm: bool = False, recurrent_dropout: float = 0.0, residual: bool = False,
             weight_drop: float = 0.0, locked_dropout: bool = False, heads: int = 4,
             block: bool = False, chrono: int = 0) -> nn.Module:
    """A stacked batch-first recurrent layer; ``dropout`` applies between layers (with
    ``locked_dropout``, one mask per sequence). ``weight_drop`` is DropConnect on the
    hidden-to-hidden weights. ``impl`` ``explicit`` builds it from its equations, which
    ``layer_norm``, ``recurrent_dropout`` and ``residual`` need. The newer cells
    (:data:`rnnkit.models.stack.STACK_CELLS`) have one implementation each; ``heads`` splits
    sLSTM's and mLSTM's state; ``block`` wraps each layer's cell in its paper's block;
    ``chrono`` > 0 sets minGRU's and minLSTM's gate biases for dependencies up to that many steps."""
    if chrono and cell not in CHRONO_CELLS:
        raise ValueError(f"chrono initialisation is built for {' and '.join(CHRONO_CELLS)}, not {cell}")
    if cell in STACK_CELLS:
        if weight_drop or recurrent_dropout:
            raise ValueError(f"{cell} takes no weight_drop or recurrent_dropout (dropout acts between its layers)")
        return CellStack(cell, input_size, hidden_size, num_layers, dropout, bidirectional, layer_norm=layer_norm,
                         residual=residual, locked_dropout=locked_dropout, heads=heads, block=block, chrono=chrono)
    if block:
        raise ValueError(f"no block is built for {cell}")
    if impl == "explicit":
        if weight_drop or locked_dropout:
            raise ValueError("weight_drop and locked_dropout need impl='fused'")
        return ExplicitRNN(cell, input_size, hidden_size, num_layers, dropout, bidirectional,
                           layer_norm, recurrent_dropout, residual)
    if layer_norm or recurrent_dropout or residual:
        raise ValueError("layer_norm, recurrent_dropout and residual need impl='explicit'")
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                  dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
                  batch_first=True)
    regularised = bool(weight_drop or (locked_dropout and kwargs["dropout"]))
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")
    if cell in ("rnn_tanh", "rnn_relu"):
        kwargs["nonlinearity"] = cell[4:]
    if regularised:
        layer = {"lstm": RegularisedLSTM, "gru": RegularisedGRU}.get(cell, RegularisedRNN)(**kwargs)
        layer.weight_drop, layer.locked = weight_drop, locked_dropout
        return layer
    return {"lstm": nn.LSTM, "gru": nn.GRU}.get(cell, nn.RNN)(**kwargs)


class _Regularised:
    """Training-time regularisers for ``torch.nn``'s fused recurrent layers, with their
    parameters and names unchanged (checkpoints and :func:`rnn_step` see a plain layer):

    - ``weight_drop``: DropConnect on each hidden-to-hidden matrix (Wan et al.; AWD-LSTM): a
      fresh mask per forward call, shared by every time step and sequence of the call, so the
      recurrence itself is regularised while the fused kernel still runs. The stored
      parameter is never changed; its gradient flows through the mask.
    - ``locked``: dropout between layers with one mask per sequence.

    In evaluation both are off and the layer is exactly its ``torch.nn`` self."""

    weight_drop: float = 0.0
    locked: bool = False

    def forward(self, x, hx=None):
        if not self.training:
            return super().forward(x, hx)
        packed = isinstance(x, PackedSequence)
        lstm, directions = self.mode == "LSTM", 2 if self.bidirectional else 1
        if packed:      # as torch.nn does: the data of every step together, rows sorted by length
            data, sizes, order, unorder = x
            batch = int(sizes[0])
        else:
            data, batch = x, x.size(0)
        if hx is None:
            zeros = data.new_zeros(self.num_layers * directions, batch, self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        elif packed and order is not None:
            hx = tuple(h.index_select(1, order) for h in hx) if lstm else hx.index_select(1, order)
        run = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[self.mode]
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer and self.dropout:
                if not self.locked:
                    data = dropout(data, self.dropout, True)
                elif packed:    # each sequence's mask (in batch order), looked up for its rows of every step
                    rows = torch.cat([torch.arange(int(n)) for n in sizes]).to(data.device)
                    mask = dropout_mask((batch, data.size(-1)), self.dropout, data)
                    data = data * mask[rows if order is None else order[rows]]
                else:
                    data = locked_dropout(data, self.dropout, True)
            lo = layer * directions
            state = (hx[0][lo:lo + directions], hx[1][lo:lo + directions]) if lstm else hx[lo:lo + directions]
            weights = regularised_weights(self, layer)
            if packed:
                out = run(data, sizes, state, weights, True, 1, 0.0, True, directions == 2)
            else:
                out = run(data, state, weights, True, 1, 0.0, True, directions == 2, True)
            data = out[0]
            hs.append(out[1])
            if lstm:
                cs.append(out[2])
        h = torch.cat(hs)
        final = (h, torch.cat(cs)) if lstm else h
        if packed:
            if unorder is not None:
                final = tuple(f.index_select(1, unorder) for f in final) if lstm else final.index_select(1, unorder)
            return PackedSequence(data, sizes, order, unorder), final
        return data, final


def regularised_weights(rnn: nn.RNNBase, layer: int) -> list[torch.Tensor]:
    """A fused layer's weights of ``layer`` (every direction) in torch's functional order, the
    hidden-to-hidden matrices masked by the layer's ``weight_drop`` in training."""
    p = getattr(rnn, "weight_drop", 0.0) if rnn.training else 0.0
    weights = []
    for suffix in ("", "_reverse")[:2 if rnn.bidirectional else 1]:
        w_hh = getattr(rnn, f"weight_hh_l{layer}{suffix}")
        weights += [getattr(rnn, f"weight_ih_l{layer}{suffix}"),
                    nn.functional.dropout(w_hh, p, training=True) if p else w_hh,
                    getattr(rnn, f"bias_ih_l{layer}{suffix}"), getattr(rnn, f"bias_hh_l{layer}{suffix}")]
    return weights


class RegularisedLSTM(_Regularised, nn.LSTM):
    pass


class RegularisedGRU(_Regularised, nn.GRU):
    pass


class RegularisedRNN(_Regularised, nn.RNN):
    pass


State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def state_size(rnn: nn.Module) -> int:
    """The width of one layer-direction's state tensor: H, or more for a cell that carries a
    memory besides its output (sLSTM, mLSTM; an LSTM's c is a second tensor)."""
    return getattr(rnn, "state_size", rnn.hidden_size)


def state_output(rnn: nn.Module, state: State) -> torch.Tensor:
    """The outputs h (layers * directions, B, H) held in a state."""
    return state[0] if isinstance(state, tuple) else state[..., :rnn.hidden_size]


def rnn_layer_parameters(rnn: nn.Module) -> list[list[nn.Parameter]]:
    """A stacked layer's parameters by depth (every direction of a layer together), read from
    the ``_l{N}`` in their names, which the fused and explicit layers share."""
    layers: dict[int, list[nn.Parameter]] = {}
    for name, q in rnn.named_parameters():
        match = re.search(r"_l(\d+)", name)
        layers.setdefault(int(match.group(1)) if match else 0, []).append(q)
    return [layers[k] for k in sorted(layers)]


def stack_groups(bottom: list[nn.Module | None], rnn: nn.Module, top: list[nn.Module | None]) -> list[list[nn.Parameter]]:
    """Parameter groups from input to output for layer-wise learning rates and gradual
    unfreezing: the ``bottom`` modules, each recurrent layer, the ``top`` modules. A shared
    (tied) parameter belongs to the lowest group that holds it; empty groups are left out."""
    groups = [[q for m in bottom if m is not None for q in m.parameters()], *rnn_layer_parameters(rnn),
              [q for m in top if m is not None for q in m.parameters()]]
    seen: set[int] = set()
    out = []
    for group in groups:
        kept = [q for q in group if id(q) not in seen]
        seen.update(id(q) for q in kept)
        if kept:
            out.append(kept)
    return out

_CELL_FNS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
             "RNN_RELU": torch.rnn_relu_cell}


def rnn_step(rnn: nn.Module, x: torch.Tensor, state: State,
             masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
    """One time step of a unidirectional ``rnn`` made by :func:`make_rnn`, exactly as
    ``rnn(x.unsqueeze(1), state)`` computes it: ``x`` (N, input) and ``state`` (layers, N, H)
    (an (h, c) pair for LSTMs) -> top layer's output (N, H) and the new state. ``masks``:
    an explicit layer's recurrent-dropout masks for the sequence (:func:`step_masks`)."""
    if isinstance(rnn, (ExplicitRNN, CellStack)):
        return rnn.step(x, state, masks)
    if not isinstance(rnn, nn.RNNBase) or torch.onnx.is_in_onnx_export():
        # a quantised layer (``--int8``), or an ONNX graph's recurrent operator: one step long
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
            x = dropout(x, rnn.dropout, training=True)
    new = (torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs)
    return hs[-1], new


def step_masks(rnn: nn.Module, batch: int, like: torch.Tensor) -> list[torch.Tensor] | None:
    """Recurrent-dropout masks held fixed over a loop of :func:`rnn_step` calls (None if unused)."""
    return rnn.step_masks(batch, like) if isinstance(rnn, ExplicitRNN) else None


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) True on each row's first ``length`` positions."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried hidden state (truncated backpropagation through time)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


# Gate pre-activation added on padding by :func:`run_padded`: sigmoid of it is exactly 0 or 1
# in fp32 and bf16, so the state passes padding unchanged and no gradient flows into it.
_HOLD = 1e4
# (gate index, sign) of the gates held saturated on padding, in torch's gate order
_HOLD_GATES = {"LSTM": ((0, -1.0), (1, 1.0)),     # i, f, g, o: input gate shut, forget gate open
               "GRU": ((1, 1.0),)}                 # r, z, n: update gate keeps the old state


def run_padded(rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, State]:
    """A layer made by :func:`make_rnn` over padded sequences ``x`` (B, S, input) from a zero
    state, as if packed: outputs (B, S, D*H) zero past each row's length, and the final state
    (layers*D, B, H) (an (h, c) pair for LSTMs) at each row's own end, every direction.

    On CPU, fused LSTM and GRU layers run on the padded batch itself, with oneDNN's fused
    kernels (packed sequences take a slower per-step path there, 1.6x in bf16): one extra
    input column, 1 on padding, drives the gates that keep the state (LSTM: forget 1, input
    0; GRU: update 1) into saturation, so a forward direction's state holds still after a
    row's end and a backward direction's stays zero until its start. Other layers, every
    layer on GPU (cuDNN reads packed sequences natively), and ONNX export (whose recurrent
    operators take sequence lengths; the column's large weights would also spoil int8) are
    packed. The newer cells take the padded batch and its lengths themselves."""
    if isinstance(rnn, CellStack):
        return rnn(x, lengths=lengths)
    fused = type(rnn) in (nn.LSTM, nn.GRU, RegularisedLSTM, RegularisedGRU) and x.device.type == "cpu" \
        and not rnn.proj_size and not torch.onnx.is_in_onnx_export()   # a graph: sequence lengths, no column
    if not fused:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = rnn(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0], final
    lstm, hidden, directions = rnn.mode == "LSTM", rnn.hidden_size, 2 if rnn.bidirectional else 1
    batch, lengths = x.size(0), lengths.to(x.device)
    held = (~length_mask(lengths, x.size(1))).unsqueeze(-1)
    column = torch.zeros((4 if lstm else 3) * hidden, 1, device=x.device)
    for gate, sign in _HOLD_GATES[rnn.mode]:
        column[gate * hidden:(gate + 1) * hidden] = sign * _HOLD
    last = (lengths - 1).view(batch, 1, 1).expand(batch, 1, hidden)
    zeros = x.new_zeros(directions, batch, hidden)
    finals_h, finals_c = [], []
    for layer in range(rnn.num_layers):
        if layer:
            drop = locked_dropout if getattr(rnn, "locked", False) else dropout
            x = drop(x, rnn.dropout, training=rnn.training)
        weights = regularised_weights(rnn, layer)
        for i in range(0, len(weights), 4):     # every direction's input weights take the extra column
            weights[i] = torch.cat([weights[i], column.to(weights[i].dtype)], 1)
        inp = torch.cat([x, held.to(x.dtype)], -1)
        if lstm:
            out, _, c = torch.lstm(inp, (zeros, zeros), weights, True, 1, 0.0, rnn.training, directions == 2, True)
            finals_c.append(c)
        else:
            out, _ = torch.gru(inp, zeros, weights, True, 1, 0.0, rnn.training, directions == 2, True)
        # a forward direction's last state is its output at the row's end (its state after
        # the padding is the same for a GRU, not for an LSTM's h); a backward one's, at 0
        finals_h.append(out[:, :, :hidden].gather(1, last).squeeze(1))
        if directions == 2:
            finals_h.append(out[:, 0, hidden:])
        x = out.masked_fill(held, 0.0)
    h = torch.stack(finals_h)
    return x, (h, torch.cat(finals_c)) if lstm else h


class _Shared(torch.autograd.Function):
    """A weight used at every step of a loop, in the loop's arithmetic. Each step's
    :class:`_StepProduct` leaves its input and output gradient in ``store`` instead of a
    weight gradient, and this node, which autograd reaches after all of them, turns them
    into the weight's gradient with one product over every step."""

    @staticmethod
    def forward(ctx, store: list, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.store = store
        ctx.set_materialize_grads(False)
        return weight.view_as(weight) if weight.dtype == dtype else weight.to(dtype)

    @staticmethod
    def backward(ctx, _unused):
        if not ctx.store:
            return None, None, None
        inputs = torch.cat([x for x, _ in ctx.store])
        grads = torch.cat([g for _, g in ctx.store])
        ctx.store.clear()
        return None, grads.t().mm(inputs), None


class _StepProduct(torch.autograd.Function):
    """``x @ weight.T`` for one step, with ``weight`` from :class:`_Shared`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, store: list) -> torch.Tensor:
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.store = store
        return dense(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        ctx.store.append((x, grad))
        return grad_input(grad, weight), None, None


class SharedProduct:
    """``x @ weight.T`` at every step of a loop, the weight's gradient taken as one product
    over all steps after the loop (:class:`_Shared`) instead of a small one per step; the
    product in autocast's dtype when it is on."""

    def __init__(self, weight: torch.Tensor):
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.store: list = []
        self.weight = _Shared.apply(self.store, weight, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _StepProduct.apply(x, self.weight, self.store)


class LSTMSteps:
    """A fused unidirectional ``nn.LSTM`` run step by step where each step's input is a known
    part (K columns: a decoder's word embedding) followed by a part only that step knows
    (input feeding's previous output). The known part's product is prepared ahead:

    - ``LSTMSteps(rnn, known)`` for training on gold words, ``known`` (B, T, K) every step's
      known columns: one product for all steps before the loop;
    - ``LSTMSteps.for_tokens(rnn, embedding)`` for search: one product for the whole
      vocabulary, and each step looks its tokens' rows up.

    Faster than :func:`rnn_step`: each step's recurrent product reads its new input and the
    state together (one product), and in backward each weight's gradient is one product over
    all steps (:class:`_Shared`) instead of a small one per step (a batch's rows) added up.
    Cell arithmetic is fp32, as ``torch.lstm_cell``'s under autocast; the products run in
    autocast's dtype when it is on."""

    def __init__(self, rnn: nn.LSTM, known: torch.Tensor, per_token: bool = False):
        k = known.size(-1)
        self.rnn, self.cell_dtype, self.per_token = rnn, torch.promote_types(known.dtype, torch.float32), per_token
        w = rnn.weight_ih_l0
        known = nn.functional.linear(known, w[:, :k], rnn.bias_ih_l0 + rnn.bias_hh_l0)
        self.known = known if per_token else known.unbind(1)
        self.products, self.biases = [], [None]
        for layer in range(rnn.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
            self.products.append(SharedProduct(torch.cat([w_ih[:, k:] if layer == 0 else w_ih, w_hh], 1)))
            if layer:
                self.biases.append(getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}"))

    @classmethod
    def for_tokens(cls, rnn: nn.LSTM, embedding: nn.Embedding) -> "LSTMSteps":
        return cls(rnn, embedding.weight, per_token=True)

    @staticmethod
    def applies(rnn: nn.Module) -> bool:
        """A fused unidirectional LSTM on CPU (on GPU, torch's fused cell kernel does the
        cell's arithmetic in one launch where this takes ten)."""
        return (type(rnn) is nn.LSTM and not rnn.bidirectional and not rnn.proj_size
                and rnn.weight_hh_l0.device.type == "cpu")

    def step(self, t: int | torch.Tensor, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Step ``t`` (for_tokens: the step's token ids (N,)) with the unknown columns ``x``
        (N, I - K) -> top output (N, H), new (h, c)."""
        rnn, hs, cs = self.rnn, [], []
        for layer in range(rnn.num_layers):
            if layer and rnn.dropout and rnn.training:
                x = dropout(x, rnn.dropout, training=True)
            gates = self.products[layer](torch.cat([x, state[0][layer]], 1))
            if layer:
                added = self.biases[layer]
            else:
                added = self.known.index_select(0, t) if self.per_token else self.known[t]
            gates = gates.to(self.cell_dtype) + added
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))
