"""xLSTM's two residual blocks (Beck et al. 2024, Figs. 10 and 11) around its cells, and the
parts they share with Hawk's block: a causal depthwise convolution whose window rides in the
recurrent state, and xLSTM's block-diagonal projections.

**mLSTM block** (pre up-projection; the layer's width H, the inner width E = 2H, K heads of
d = E / K):

    x_m, z = W_up x_t                                 (E each)
    c_t = SiLU(conv(x_m)_t)                           causal, depthwise, width 4
    q_t, k_t = B_q c_t, B_k c_t / sqrt(d),  v_t = B_v x_m,t        (B: blocks of 4 x 4)
    i~_t, f~_t = W_i [q; k; v], W_f [q; k; v]         (one per head)
    h~_t = the mLSTM read-out from q, k, v, i, f      (no output gate of its own)
    y_t = W_down ((N(h~_t) + s * c_t) * SiLU(z_t))    (N: per-head RMS norm; s learned)

**sLSTM block** (post up-projection; K heads over H, the feed-forward width ceil(4H/3)):

    c_t = SiLU(conv(x_t)_t)
    h_t = sLSTM, its i and f gates reading c_t, its z and o gates reading x_t
    s_t = N(h_t)                                      (per head)
    a, b = W_up LN(s_t);   y_t = s_t + W_down (GeLU(a) * b)

The pre-norm and the residual sum around each block are the stack's ``layer_norm`` and
``residual`` options (the paper's residual backbone is ``layer_norm: true, residual: true``).
One difference from the paper: the sLSTM block's feed-forward part reads and adds to its own
sLSTM output, not to the residual stream of the whole stack, so that the stack's residual
stays one option for every cell. An sLSTM block whose input is not H wide maps it to H first
(a linear map), so every layer's convolution window has the same width.

The state of a block is its output y first, then its cell's stabilised memory, then the
convolution's last three inputs: a step, a state carried across truncated-BPTT chunks and a
padded batch see it as any state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.products import run_linear
from rnnkit.models.scan import last_real, widen
from rnnkit.models.xlstm import (SHUT, SLSTMCell, _check_heads, _held_or_none, _mlstm_step, _scripted, head_norm,
                                 mlstm_positions_first, mlstm_sequential)


class CausalConv(nn.Conv1d):
    """A causal depthwise convolution of width 4 over (B, T, C) inputs; the three inputs
    before the first position (the ``window``, (B, 3, C)) come from the state."""

    width = 4

    def __init__(self, channels: int):
        super().__init__(channels, channels, self.width, groups=channels)

    def run(self, u: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) inputs -> the convolution at every position (B, T, C), and the inputs
        with the window before them (B, T + 3, C), for :meth:`ends`."""
        full = torch.cat([window, u], 1)
        return self(full.transpose(1, 2)).transpose(1, 2), full

    def ends(self, full: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The window after position ``last`` (B,) of each row: its last three inputs."""
        rows = torch.arange(full.size(0), device=full.device).unsqueeze(1)
        return full[rows, last.unsqueeze(1) + torch.arange(1, self.width, device=full.device)]

    def step(self, u: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position (N, C) -> its convolution (N, C) and the next window."""
        full = torch.cat([window, u.unsqueeze(1)], 1)
        return (full * self.weight[:, 0].t()).sum(1) + self.bias, full[:, 1:]

    def sequential(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The convolution at the newest of ``inputs`` (each (B, C), oldest first, at least
        four), tap by tap."""
        return sum(self.weight[:, 0, j] * inputs[j - self.width] for j in range(self.width)) + self.bias


class BlockDiagonal(nn.Module):
    """A linear map without bias whose weight is block-diagonal, blocks of ``size`` x
    ``size`` (xLSTM's projections of q, k and v): ``weight`` (width / size, size, size)."""

    def __init__(self, width: int, size: int = 4):
        super().__init__()
        if width % size:
            raise ValueError(f"width {width} does not divide into blocks of {size}")
        self.weight = nn.Parameter(torch.empty(width // size, size, size))
        nn.init.uniform_(self.weight, -1 / math.sqrt(size), 1 / math.sqrt(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size = self.weight.size(0), self.weight.size(1)
        weight = self.weight.to(x.dtype)
        if torch.onnx.is_in_onnx_export():      # a traced einsum would fix the graph's length
            blocks = x.reshape(-1, n, size).transpose(0, 1)                           # (n, rows, size)
            return torch.bmm(blocks, weight.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        return torch.einsum("...ni,noi->...no", x.unflatten(-1, (n, size)), weight).flatten(-2)

    def dense(self) -> torch.Tensor:
        """The whole (width, width) matrix, for the sequential definition."""
        return torch.block_diag(*self.weight)


def _window_split(state: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's state -> everything before the window, and the window (..., 3, width)."""
    cut = state.size(-1) - (CausalConv.width - 1) * width
    return state[..., :cut], state[..., cut:].unflatten(-1, (CausalConv.width - 1, width))


def _flipper(reverse: bool):
    return (lambda t: t.flip(1)) if reverse else (lambda t: t)


def _final(held: torch.Tensor | None, conv: CausalConv, full: torch.Tensor, *per_position: torch.Tensor,
           carried: torch.Tensor | None = None) -> torch.Tensor:
    """A block's final state at each row's last real position: the ``per_position`` tensors
    (B, T, .) there, then the ``carried`` memory (B, .) if any, then the convolution's window."""
    batch, steps = full.size(0), full.size(1) - (CausalConv.width - 1)
    last = last_real(held, steps, batch, full.device)
    rows = torch.arange(batch, device=full.device)
    parts = [t[rows, last] for t in per_position] + ([] if carried is None else [carried])
    return torch.cat([*parts, conv.ends(full, last).flatten(1)], -1)


class MLSTMBlock(nn.Module):
    """xLSTM's mLSTM block (pre up-projection, inner width 2H) in place of a bare cell."""

    chunk = 128     # its heads are twice as wide as the bare cell's: fewer, longer chunks pay
    factor = 2

    def __init__(self, input_size: int, hidden_size: int, heads: int = 4):
        super().__init__()
        self.hidden_size, self.heads = hidden_size, heads
        self.inner = e = self.factor * hidden_size
        self.head_size = d = _check_heads(e, heads)
        self.memory_size = heads * d * d + e + heads           # memory, normaliser, stabiliser
        self.state_size = hidden_size + self.memory_size + (CausalConv.width - 1) * e
        self.up = nn.Linear(input_size, 2 * e)
        self.conv = CausalConv(e)
        self.q, self.k, self.v = BlockDiagonal(e), BlockDiagonal(e), BlockDiagonal(e)
        self.gates = nn.Linear(3 * e, 2 * heads)
        self.head_norm = nn.Parameter(torch.ones(e))
        self.skip = nn.Parameter(torch.ones(e))
        self.down = nn.Linear(e, hidden_size)
        with torch.no_grad():     # as xLSTM starts them: input gates near 0, forget gates open
            self.gates.weight.zero_()
            self.gates.bias[:heads].normal_(0.0, 0.1)
            self.gates.bias[heads:].copy_(torch.linspace(3.0, 6.0, heads))

    def _split(self, state: torch.Tensor):
        """state -> memory (..., K, d, d), norm (..., K, d), m (..., K), window (..., 3, E)."""
        k, d, e = self.heads, self.head_size, self.inner
        rest, window = _window_split(state[..., self.hidden_size:], e)
        memory, norm, m = rest.split([k * d * d, e, k], -1)
        return memory.unflatten(-1, (k, d, d)), norm.unflatten(-1, (k, d)), m, window

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., K, d)."""
        return t.unflatten(-1, (self.heads, self.head_size))

    def _inputs(self, x: torch.Tensor):
        """(..., input) -> x_m and z (..., E) from the up-projection."""
        return widen(run_linear(self.up, x)).chunk(2, -1)

    def _qkv(self, c: torch.Tensor, xm: torch.Tensor):
        """q, k (scaled), v (..., E) and the gates i~, log f (..., K)."""
        q, k, v = widen(self.q(c)), widen(self.k(c)), widen(self.v(xm))
        i_pre, f_pre = widen(run_linear(self.gates, torch.cat([q, k, v], -1))).chunk(2, -1)
        return q, k / math.sqrt(self.head_size), v, i_pre, F.logsigmoid(f_pre)

    def _out(self, read: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y from the normalised read-out (..., E)."""
        return run_linear(self.down, (read + self.skip * c) * F.silu(z))

    def run(self, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        flip = _flipper(reverse)
        x, held = flip(x), None if held is None else flip(held)
        memory, norm, m, window = self._split(state)
        xm, z = self._inputs(x)
        if held is not None:      # padding reads as zeros (a reversed row's padding comes first)
            xm = xm.masked_fill(held, 0.0)
        conv, full = self.conv.run(xm, window)
        c = F.silu(widen(conv))
        q, k, v, i_pre, log_f = self._qkv(c, xm)
        if held is not None:      # f = 1 and i = 0: the memory passes unchanged
            i_pre, log_f = i_pre.masked_fill(held, SHUT), log_f.masked_fill(held, 0.0)
        if torch.onnx.is_in_onnx_export():
            read, memory = self._graph(q, k, v, i_pre, log_f, held, memory, norm, m)
        else:
            q, k, v = (self._heads(t) for t in (q, k, v))
            read, (memory, norm, m) = mlstm_positions_first(q, k, v, i_pre, log_f, memory, norm, m, self.chunk)
            read = head_norm(read, self.head_norm)
            memory = torch.cat([memory.flatten(1), norm.flatten(1), m], -1)
        y = self._out(read, c, z)
        return flip(y), _final(held, self.conv, full, y, carried=memory)

    def _graph(self, q, k, v, i_pre, log_f, held, memory, norm, m):
        """The read-out inside an exported graph: the mLSTM's scripted loop, with an output
        gate of 1 and a cell state built around the block's memory."""
        cell_state = torch.cat([q[:, 0] * 0, memory.flatten(1), norm.flatten(1), m], -1)
        read, final = _scripted("mlstm")(q, k, v, v * 0 + 1, i_pre, log_f, _held_or_none(held, q), cell_state,
                                         self.heads, self.head_norm)
        return read, final[:, self.inner:]

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, norm, m, window = self._split(state)
        xm, z = self._inputs(x)
        conv, window = self.conv.step(xm, window)
        c = F.silu(conv)
        q, k, v, i_pre, log_f = self._qkv(c, xm)
        q, k, v = (self._heads(t) for t in (q, k, v))
        read, memory, norm, m = _mlstm_step(q, k, v, 1.0, i_pre, log_f, memory, norm, m, self.head_norm)
        y = self._out(read, c, z)
        return y, torch.cat([y, memory.flatten(1), norm.flatten(1), m, window.flatten(1)], -1)

    def sequential(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's equations one position at a time, the projections as dense matrices
        and the mLSTM without its stabiliser."""
        memory, norm, m, window = self._split(state)
        up = x @ self.up.weight.t() + self.up.bias
        xm, z = up[..., :self.inner], up[..., self.inner:]
        inputs = list(window.unbind(1)) + list(xm.unbind(1))
        c = torch.stack([F.silu(self.conv.sequential(inputs[:t + CausalConv.width]))
                         for t in range(x.size(1))], 1)
        q, k, v = c @ self.q.dense().t(), c @ self.k.dense().t(), xm @ self.v.dense().t()
        gates = torch.cat([q, k, v], -1) @ self.gates.weight.t() + self.gates.bias
        q, k, v = self._heads(q), self._heads(k) / math.sqrt(self.head_size), self._heads(v)
        read, memory, norm, m = mlstm_sequential(q, k, v, 1.0,
                                                 gates[..., :self.heads], gates[..., self.heads:],
                                                 memory, norm, m, self.head_norm)
        y = ((read + self.skip * c) * F.silu(z)) @ self.down.weight.t() + self.down.bias
        return y, torch.cat([y[:, -1], memory.flatten(1), norm.flatten(1), m,
                             torch.stack(inputs[-(CausalConv.width - 1):], 1).flatten(1)], -1)


class SLSTMBlock(nn.Module):
    """xLSTM's sLSTM block (post up-projection, feed-forward width ceil(4H/3)) in place of a
    bare cell."""

    def __init__(self, input_size: int, hidden_size: int, heads: int = 4):
        super().__init__()
        self.hidden_size, self.heads = hidden_size, heads
        self.head_size = _check_heads(hidden_size, heads)
        self.state_size = hidden_size + 4 * hidden_size + (CausalConv.width - 1) * hidden_size
        self.inp = nn.Linear(input_size, hidden_size) if input_size != hidden_size else nn.Identity()
        self.conv = CausalConv(hidden_size)
        self.slstm = SLSTMCell(hidden_size, hidden_size, heads)
        self.head_norm = nn.Parameter(torch.ones(hidden_size))
        ffn = -(-4 * hidden_size // 3)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn_up = nn.Linear(hidden_size, 2 * ffn)
        self.ffn_down = nn.Linear(ffn, hidden_size)

    def _split(self, state: torch.Tensor):
        """state -> the sLSTM's state (..., 4H), the window (..., 3, H)."""
        return _window_split(state[..., self.hidden_size:], self.hidden_size)

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        s = head_norm(h.unflatten(-1, (self.heads, self.head_size)), self.head_norm)
        a, b = run_linear(self.ffn_up, self.ffn_norm(s)).chunk(2, -1)
        return s + run_linear(self.ffn_down, F.gelu(a) * b)

    def run(self, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        flip = _flipper(reverse)
        x, held = flip(x), None if held is None else flip(held)
        cell, window = self._split(state)
        u = widen(run_linear(self.inp, x))
        if held is not None:
            u = u.masked_fill(held, 0.0)
        conv, full = self.conv.run(u, window)
        h, cell = self.slstm.run(u, cell, held, False, gates_from=F.silu(widen(conv)))
        y = self._out(h)
        return flip(y), _final(held, self.conv, full, y, carried=cell)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cell, window = self._split(state)
        u = widen(self.inp(x))
        conv, window = self.conv.step(u, window)
        h, cell = self.slstm.step(u, cell, gates_from=F.silu(conv))
        y = self._out(h)
        return y, torch.cat([y, cell, window.flatten(1)], -1)

    def sequential(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's equations one position at a time (the sLSTM without its stabiliser)."""
        cell, window = self._split(state)
        u = self.inp(x)
        inputs = list(window.unbind(1)) + list(u.unbind(1))
        c = torch.stack([F.silu(self.conv.sequential(inputs[:t + CausalConv.width])) for t in range(x.size(1))], 1)
        h, cell = self.slstm.sequential(u, cell, gates_from=c)
        s = head_norm(h.unflatten(-1, (self.heads, self.head_size)), self.head_norm)
        hidden = F.layer_norm(s, (self.hidden_size,), self.ffn_norm.weight, self.ffn_norm.bias)
        a, b = (hidden @ self.ffn_up.weight.t() + self.ffn_up.bias).chunk(2, -1)
        y = s + (F.gelu(a) * b) @ self.ffn_down.weight.t() + self.ffn_down.bias
        return y, torch.cat([y[:, -1], cell, torch.stack(inputs[-(CausalConv.width - 1):], 1).flatten(1)], -1)
