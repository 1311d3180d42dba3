"""xLSTM's two cells (Beck et al. 2024): sLSTM and mLSTM, with exponential input gates and
the stabiliser state that keeps them finite.

sLSTM, per unit, gate pre-activations from the input and from the previous output through
block-diagonal recurrent weights (one block per head: memory mixing within a head only):

    i~, f~, z~, o~ = W x_t + R h_(t-1) + b
    c_t = f_t c_(t-1) + i_t tanh(z~)          i_t = exp(i~), f_t = sigmoid(f~)
    n_t = f_t n_(t-1) + i_t                   (the normaliser)
    h_t = sigmoid(o~) * c_t / n_t

The gates read h_(t-1), so the recurrence is not linear: sLSTM runs one position at a time
in every form (its input products for all positions are one product beforehand).

mLSTM, per head of width d, a matrix memory written with a key and read with a query:

    q_t = W_q x_t,  k_t = W_k x_t / sqrt(d),  v_t = W_v x_t,  o_t = sigmoid(W_o x_t)
    i~_t, f~_t = w_i x_t, w_f x_t             (one input and one forget gate per head)
    C_t = f_t C_(t-1) + i_t k_t v_t^T         (stored as keys x values: h is q^T C, the
    n_t = f_t n_(t-1) + i_t k_t                paper's C q with C transposed)
    h_t = o_t * N(q_t^T C_t / max(|q_t^T n_t|, 1))      (N: each head's d numbers divided
                                                          by their RMS, a learned scale)

No gate reads the state, so a whole sequence has a closed form; :func:`mlstm_chunkwise`
(:mod:`rnnkit.models.mlstm_chunks`) computes it a chunk at a time (within a chunk, all
positions at once; across chunks, the memory carried, one step per chunk).

The stabiliser: exp(i~) overflows, so every state is kept divided by exp(m_t), with
m_t = max(log f_t + m_(t-1), i~_t); then i_t exp(-m_t) and f_t exp(m_(t-1) - m_t) are at
most 1, and the output, a ratio of two stabilised quantities (the 1 of mLSTM's
denominator becoming exp(-m_t)), is unchanged. The stabilised state is what the cells
carry: [h, c, n, m] for sLSTM, [h, C, n, m] for mLSTM, flat, h first.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.mlstm_chunks import SHUT, mlstm_chunkwise
from rnnkit.models.products import run_linear
from rnnkit.models.scan import last_real, widen
from rnnkit.models.slstm_loop import SLSTMRun, _slstm_recurrent, _slstm_update


def _check_heads(hidden_size: int, heads: int) -> int:
    if heads < 1 or hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} does not divide into {heads} heads")
    return hidden_size // heads


# --------------------------------------------------------------------------- sLSTM
class SLSTMCell(nn.Module):
    """One sLSTM layer-direction: ``inp`` (x -> [i, f, z, o] pre-activations) and ``rec``
    (heads, 4 * d, d): each head's recurrent block, rows gate-major."""

    def __init__(self, input_size: int, hidden_size: int, heads: int = 4):
        super().__init__()
        self.hidden_size, self.heads = hidden_size, heads
        self.head_size = _check_heads(hidden_size, heads)
        self.state_size = 4 * hidden_size
        self.inp = nn.Linear(input_size, 4 * hidden_size)
        self.rec = nn.Parameter(torch.empty(heads, 4 * self.head_size, self.head_size))
        nn.init.uniform_(self.rec, -1 / math.sqrt(self.head_size), 1 / math.sqrt(self.head_size))
        with torch.no_grad():     # forget gates start open (sigmoid 0.95 to 0.998), as xLSTM's do
            self.inp.bias[hidden_size:2 * hidden_size].copy_(torch.linspace(3.0, 6.0, hidden_size))

    def _recurrent(self, h: torch.Tensor) -> torch.Tensor:
        return _slstm_recurrent(h, self.rec, self.heads)

    def _advance(self, pre: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return _slstm_update(pre, state, self.rec, self.heads)

    def _pre(self, x: torch.Tensor, gates_from: torch.Tensor | None) -> torch.Tensor:
        """The input's pre-activations [i, f, z, o]; with ``gates_from`` (xLSTM's block: the
        convolved input), i and f read it and z and o read ``x``."""
        if gates_from is None:
            return widen(run_linear(self.inp, x))
        half = 2 * self.hidden_size
        if not isinstance(self.inp.weight, torch.Tensor):     # an int8 layer: no weight to slice, both products
            return widen(torch.cat([self.inp(gates_from)[..., :half], self.inp(x)[..., half:]], -1))
        w, b = self.inp.weight, self.inp.bias
        return widen(torch.cat([F.linear(gates_from, w[:half], b[:half]), F.linear(x, w[half:], b[half:])], -1))

    def step(self, x: torch.Tensor, state: torch.Tensor,
             gates_from: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        new = self._advance(self._pre(x, gates_from), state)
        return new[:, :self.hidden_size], new

    def run(self, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
            reverse: bool, gates_from: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, input) -> outputs (B, T, H) and the final state; a padded position
        (``held`` (B, T, 1)) keeps the state as it was. Sequential: one position at a time."""
        pre = self._pre(x, gates_from)
        if torch.onnx.is_in_onnx_export():
            held = _held_or_none(held, pre)
            pre, held = (pre.flip(1), held.flip(1)) if reverse else (pre, held)
            out, state = _scripted("slstm")(pre, held, state, self.rec, self.heads)
            return (out.flip(1) if reverse else out), state
        return SLSTMRun.apply(pre, state, self.rec, held, self.heads, reverse)

    def sequential(self, x: torch.Tensor, state: torch.Tensor,
                   gates_from: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations without the stabiliser (c and n themselves), one position at a
        time; m follows its own recursion only to express the final state as the others do."""
        gates_from = x if gates_from is None else gates_from
        h, c, n, m = state.chunk(4, -1)
        c, n = c * torch.exp(m), n * torch.exp(m)
        w_i, w_f, w_z, w_o = self.inp.weight.chunk(4, 0)
        b_i, b_f, b_z, b_o = self.inp.bias.chunk(4, 0)
        out = []
        for t in range(x.size(1)):
            r_i, r_f, r_z, r_o = self._recurrent(h).chunk(4, -1)
            xt, gt = x[:, t], gates_from[:, t]
            i_pre = gt @ w_i.t() + b_i + r_i
            f = torch.sigmoid(gt @ w_f.t() + b_f + r_f)
            c = f * c + torch.exp(i_pre) * torch.tanh(xt @ w_z.t() + b_z + r_z)
            n = f * n + torch.exp(i_pre)
            h = torch.sigmoid(xt @ w_o.t() + b_o + r_o) * c / n
            m = torch.maximum(torch.log(f) + m, i_pre)
            out.append(h)
        return torch.stack(out, 1), torch.cat([h, c * torch.exp(-m), n * torch.exp(-m), m], -1)


# --------------------------------------------------------------------------- mLSTM
def mlstm_positions_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_pre: torch.Tensor,
                          log_f: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor, chunk: int):
    """:func:`mlstm_chunkwise` for (B, T, K, d) q, k, v and (B, T, K) gates -> h~ (B, T, K, d)
    and the state after the last position."""
    heads_first = lambda t: t.transpose(1, 2)      # noqa: E731   (B, T, K, ...) -> (B, K, T, ...)
    h, state = mlstm_chunkwise(heads_first(q), heads_first(k), heads_first(v), heads_first(i_pre),
                               heads_first(log_f), memory, norm, m, chunk)
    return h.transpose(1, 2), state


class MLSTMCell(nn.Module):
    """One mLSTM layer-direction: ``proj`` maps x to [q, k, v, o] (H each) and one input and
    one forget gate pre-activation per head."""

    chunk = 64

    def __init__(self, input_size: int, hidden_size: int, heads: int = 4):
        super().__init__()
        self.hidden_size, self.heads = hidden_size, heads
        self.head_size = d = _check_heads(hidden_size, heads)
        self.state_size = hidden_size + heads * d * d + hidden_size + heads
        self.proj = nn.Linear(input_size, 4 * hidden_size + 2 * heads)
        self.head_norm = nn.Parameter(torch.ones(hidden_size))     # each head's read-out, layer-normalised
        with torch.no_grad():     # as xLSTM starts them: input gates near 0, forget gates open
            h4 = 4 * hidden_size
            self.proj.weight[h4:].zero_()
            self.proj.bias[h4:h4 + heads].normal_(0.0, 0.1)
            self.proj.bias[h4 + heads:].copy_(torch.linspace(3.0, 6.0, heads))

    def _parts(self, x: torch.Tensor, split: bool = True):
        """(..., input) -> q, k (scaled), v (..., K, d) (``split``; else (..., H)), o (..., H),
        i~ and log f (..., K)."""
        p = widen(run_linear(self.proj, x))
        h, k = self.hidden_size, self.heads
        q, key, v, o = p[..., :4 * h].chunk(4, -1)
        if split:
            q, key, v = (t.unflatten(-1, (k, self.head_size)) for t in (q, key, v))
        i_pre, f_pre = p[..., 4 * h:].chunk(2, -1)
        return q, key / math.sqrt(self.head_size), v, torch.sigmoid(o), i_pre, F.logsigmoid(f_pre)

    def _views(self, state: torch.Tensor):
        """The packed state's parts as views: h (..., H), memory (..., K, d, d), norm (..., K, d), m (..., K)."""
        h, k, d = self.hidden_size, self.heads, self.head_size
        out, memory, norm, m = state.split([h, k * d * d, h, k], -1)
        return out, memory.unflatten(-1, (k, d, d)), norm.unflatten(-1, (k, d)), m

    def _unpack(self, state: torch.Tensor):
        return self._views(state)[1:]

    def _pack(self, h: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, memory.flatten(-3), norm.flatten(-2), m], -1)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (torch.is_grad_enabled() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
            return self._inference_step(x, state)
        # training through the step form (an input-feeding decoder), or a graph being written
        q, k, v, o, i_pre, log_f = self._parts(x)
        h, memory, norm, m = _mlstm_step(q, k, v, o, i_pre, log_f, *self._unpack(state), self.head_norm)
        return h, self._pack(h, memory, norm, m)

    def _inference_step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` without gradients, in one scripted function: at batch 1 a step is the
        projection plus per-operation overhead, so each view and each pass counts."""
        return _scripted("mlstm_step")(widen(run_linear(self.proj, x)), state, self.head_norm, self.heads)

    def run(self, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, input) -> outputs (B, T, H) and the final state, chunkwise; on padding
        (``held``) f = 1 and i = 0."""
        graph = torch.onnx.is_in_onnx_export()     # heads split inside the graph's loop
        q, k, v, o, i_pre, log_f = self._parts(x, split=not graph)
        if held is not None:
            i_pre, log_f = i_pre.masked_fill(held, SHUT), log_f.masked_fill(held, 0.0)
        flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)     # noqa: E731
        q, k, v, o, i_pre, log_f = (flip(t) for t in (q, k, v, o, i_pre, log_f))
        if graph:
            held = flip(_held_or_none(held, o))
            h, state = _scripted("mlstm")(q, k, v, o, i_pre, log_f, held, state, self.heads, self.head_norm)
            return flip(h), state
        batch, steps = x.size(0), x.size(1)
        h, (memory, norm, m) = mlstm_positions_first(q, k, v, i_pre, log_f, *self._unpack(state), self.chunk)
        h = flip(o * head_norm(h, self.head_norm))
        last = last_real(None if held is None else flip(held), steps, batch, x.device)
        last = last if not reverse else steps - 1 - last
        h_end = h[torch.arange(batch, device=x.device), last]
        return h, self._pack(h_end, memory, norm, m)

    def sequential(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations without the stabiliser, one position at a time (m follows its
        recursion only to express the final state as the other forms do)."""
        hs, k, d = self.hidden_size, self.heads, self.head_size
        p = x @ self.proj.weight.t() + self.proj.bias
        q, key, v, o = (p[..., j * hs:(j + 1) * hs].unflatten(-1, (k, d)) for j in range(4))
        out, memory, norm, m = mlstm_sequential(q, key / math.sqrt(d), v, torch.sigmoid(o).flatten(-2),
                                                p[..., 4 * hs:4 * hs + k], p[..., 4 * hs + k:],
                                                *self._unpack(state), self.head_norm)
        return out, self._pack(out[:, -1], memory, norm, m)


def mlstm_sequential(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o, i_pre: torch.Tensor, f_pre: torch.Tensor,
                     memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor, weight: torch.Tensor):
    """mLSTM's equations without the stabiliser, one position at a time: ``q``, ``k``
    (scaled), ``v`` (B, T, K, d), ``o`` (B, T, H) (or 1), gate pre-activations (B, T, K), and
    the stabilised state before the first position -> outputs (B, T, H) and the stabilised
    state after the last (m follows its recursion only to express it as the other forms do)."""
    memory, norm = memory * torch.exp(m)[..., None, None], norm * torch.exp(m)[..., None]
    out = []
    for t in range(q.size(1)):
        i, f = torch.exp(i_pre[:, t]), torch.sigmoid(f_pre[:, t])
        memory = f[..., None, None] * memory + i[..., None, None] * k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        norm = f[..., None] * norm + i[..., None] * k[:, t]
        num = (q[:, t].unsqueeze(-2) @ memory).squeeze(-2)
        den = (q[:, t] * norm).sum(-1).abs().clamp_min(1.0)
        out.append((o[:, t] if torch.is_tensor(o) else o) * head_norm(num / den[..., None], weight))
        m = torch.maximum(torch.log(f) + m, i_pre[:, t])
    scale = torch.exp(-m)
    return torch.stack(out, 1), memory * scale[..., None, None], norm * scale[..., None], m


def _mlstm_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, i_pre: torch.Tensor,
                log_f: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor, weight: torch.Tensor):
    """One stabilised mLSTM position for (N, K, d) q, k, v, (N, H) o, (N, K) gates and the
    state -> h (N, H), memory, norm, m. Positive axes only: it also runs inside an exported
    graph's loop."""
    m_new = torch.maximum(log_f + m, i_pre)
    keep, add = torch.exp(log_f + m - m_new), torch.exp(i_pre - m_new)
    memory = keep.unsqueeze(2).unsqueeze(3) * memory + add.unsqueeze(2).unsqueeze(3) * (k.unsqueeze(3) * v.unsqueeze(2))
    norm = keep.unsqueeze(2) * norm + add.unsqueeze(2) * k
    num = torch.matmul(q.unsqueeze(2), memory)[:, :, 0]
    den = torch.maximum((q * norm).sum(2).abs(), torch.exp(-m_new))
    read = num / den.unsqueeze(2)
    return o * _rms_normalised(read, 2).flatten(1) * weight, memory, norm, m_new


def _mlstm_inference_step(p: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                          heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mlstm_step` at inference from the projection ``p`` (N, 4H + 2K) and the flat
    state (N, S) -> h (N, H) and the new flat state, each part written in place into it (not
    differentiable: ``out=``). Scripted (:func:`_scripted`): the interpreter spends less per
    operation than Python does, and at batch 1 the operations are most of a step."""
    n, hidden = p.size(0), weight.size(0)
    d = hidden // heads
    qkv = p[:, :3 * hidden].view(n, 3, heads, d)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    o_pre, i_pre, f_pre = p[:, 3 * hidden:4 * hidden], p[:, 4 * hidden:4 * hidden + heads], p[:, 4 * hidden + heads:]
    new = torch.empty_like(state)
    cut = [hidden, heads * d * d, hidden, heads]
    old, out = state.split(cut, 1), new.split(cut, 1)
    memory, norm, m = old[1].view(n, heads, d, d), old[2].view(n, heads, d), old[3]
    h_out, memory_out, norm_out, m_out = out[0], out[1].view(n, heads, d, d), out[2].view(n, heads, d), out[3]
    carried = F.logsigmoid(f_pre).add_(m)
    torch.maximum(carried, i_pre, out=m_out)
    keep = carried.sub_(m_out).exp_().unsqueeze(2)
    added = k * torch.sub(i_pre, m_out).exp_().mul_(1 / math.sqrt(d)).unsqueeze(2)        # i k / sqrt(d)
    torch.mul(memory, keep.unsqueeze(3), out=memory_out).addcmul_(added.unsqueeze(3), v.unsqueeze(2))
    torch.addcmul(added, norm, keep, out=norm_out)
    num = torch.matmul(q.unsqueeze(2), memory_out).squeeze(2)
    den = torch.maximum(torch.linalg.vecdot(q, norm_out).abs_(), m_out.neg().exp_())
    read = num.div_(den.unsqueeze(2))
    read = read.mul_(read.square().mean(2, keepdim=True).add_(1e-6).rsqrt_())
    torch.mul(read.flatten(1), weight, out=h_out).mul_(torch.sigmoid(o_pre))
    return h_out, new


def head_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's read-out h~ (..., K, d) divided by its root mean square over its d numbers,
    with a learned scale per unit -> (..., K * d). xLSTM's mLSTM layer normalises each head's
    read-out; the RMS form (no mean subtracted) keeps a head whose numbers are nearly equal
    from magnifying bf16's rounding into its output."""
    return _rms_normalised(h, h.dim() - 1).flatten(-2) * weight


def _rms_normalised(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` divided by its root mean square over ``dim`` (eps 1e-6)."""
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + 1e-6)


# --------------------------------------------------------------------------- graphs
@functools.cache
def _scripted(which: str):
    """A scripted function, compiled once per process on first use: a cell's step-by-step
    recurrence as a loop that an ONNX graph runs over any length (traced code would fix the
    length), or mLSTM's inference step."""
    functions = {"slstm": _slstm_loop, "mlstm": _mlstm_loop, "mlstm_step": _mlstm_inference_step}
    return torch.jit.script(functions[which])


def _held_or_none(held: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``held``, or no position held: computed from ``like``'s values (always False, even for
    inf or nan) because a traced zeros_like would fix the graph's batch size."""
    return held if held is not None else like[..., :1] * 0 > 1


def _slstm_loop(pre: torch.Tensor, held: torch.Tensor, state: torch.Tensor, rec: torch.Tensor, heads: int):
    hidden = pre.size(2) // 4
    out = []
    for t in range(pre.size(1)):
        state = torch.where(held[:, t], state, _slstm_update(pre[:, t], state, rec, heads))
        out.append(state[:, :hidden])
    return torch.stack(out, 1), state


def _mlstm_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, i_pre: torch.Tensor,
                log_f: torch.Tensor, held: torch.Tensor, state: torch.Tensor, heads: int, weight: torch.Tensor):
    # no batch size or length read from a shape the graph may hold fixed
    width = o.size(2)
    d = width // heads
    h = state[:, :width]
    memory = state[:, width:width + heads * d * d].reshape(-1, heads, d, d)
    norm = state[:, width + heads * d * d:2 * width + heads * d * d].reshape(-1, heads, d)
    m = state[:, 2 * width + heads * d * d:]
    out = []
    for t in range(q.size(1)):
        # _mlstm_step written out: called from here, the exporter loses its tensors' types
        m_new = torch.maximum(log_f[:, t] + m, i_pre[:, t])
        keep, add = torch.exp(log_f[:, t] + m - m_new), torch.exp(i_pre[:, t] - m_new)
        k_t, v_t, q_t = k[:, t].reshape(-1, heads, d), v[:, t].reshape(-1, heads, d), q[:, t].reshape(-1, heads, d)
        memory = keep.unsqueeze(2).unsqueeze(3) * memory + add.unsqueeze(2).unsqueeze(3) * (k_t.unsqueeze(3) * v_t.unsqueeze(2))
        norm = keep.unsqueeze(2) * norm + add.unsqueeze(2) * k_t
        num = (q_t.unsqueeze(3) * memory).sum(2)
        den = torch.maximum((q_t * norm).sum(2).abs(), torch.exp(-m_new))
        read = num / den.unsqueeze(2)
        read = (read * torch.rsqrt(read.pow(2).mean(2, keepdim=True) + 1e-6)).flatten(1) * weight
        h = torch.where(held[:, t], h, o[:, t] * read)      # a held position's gates already keep the memory
        m = m_new
        out.append(h)
    return torch.stack(out, 1), torch.cat([h, memory.flatten(1), norm.flatten(1), m], 1)
