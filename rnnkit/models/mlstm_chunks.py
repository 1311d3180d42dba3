"""mLSTM's chunkwise form (the equations are in :mod:`rnnkit.models.xlstm`): a whole sequence
a chunk at a time, all positions of a chunk at once and the matrix memory carried from chunk
to chunk, with its backward pass written out.

Autograd through the chunkwise form would keep, for every chunk, its own memory contribution,
the memory entering it twice over and half a dozen (chunk x chunk) weight matrices: at
length 4,096 several times what the layer's inputs take. :class:`MLSTMChunks` keeps the
inputs, the outputs and the state entering each chunk; going back, it computes each chunk's
(chunk x chunk) weights again and takes everything else from what it kept.

The stabilisers m inside are constants to every gradient. Each stabilised quantity is the
true one times exp(-m) for the m it was computed with, and every output is a ratio of two
such quantities with the same m (or, in the denominator's floor, the true floor 1 times the
same exp(-m)); so the outputs do not depend on those m, and they need no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SHUT = -1e30     # an input gate's log on padding: exp of it is 0, the state passes unchanged


def _own_weights(log_i: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Each position's log weight in its chunk's contribution to the state at the chunk's end:
    F_last - F_s + i~_s."""
    return decay[..., -1:] - decay + log_i


def _own(k: torch.Tensor, v: torch.Tensor, log_i: torch.Tensor, decay: torch.Tensor):
    """Each chunk's own contribution to the state at its end, stabilised by its own maximum:
    (..., s, d) k, v and (..., s) i~, F -> memory (..., d, d), norm (..., d), m (...)."""
    weight = _own_weights(log_i, decay)
    m_own = weight.amax(-1)
    scaled = k * torch.exp(weight - m_own.unsqueeze(-1)).unsqueeze(-1)
    return scaled.transpose(-1, -2) @ v, scaled.sum(-2), m_own


def _carry(total: torch.Tensor, own: tuple, memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor):
    """The state after a chunk from the state entering it and the chunk's own contribution;
    ``total`` is the chunk's whole log decay (B, K)."""
    memory_c, norm_c, m_c = own
    m_new = torch.maximum(total + m, m_c)
    keep, add = torch.exp(total + m - m_new), torch.exp(m_c - m_new)
    memory = keep[..., None, None] * memory + add[..., None, None] * memory_c
    return memory, keep[..., None] * norm + add[..., None] * norm_c, m_new


def _read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_i: torch.Tensor, decay: torch.Tensor,
          memory_in: torch.Tensor, norm_in: torch.Tensor, m_in: torch.Tensor):
    """Every position's h~ from its chunk's earlier positions and the state entering the
    chunk: (B, K, N, s, d) q, k, v, (B, K, N, s) gates and the entering states -> h~, its
    denominator before the floor and each position's stabiliser m_t (B, K, N, s)."""
    m_t = _stabilisers(decay, log_i, m_in)
    scores = (q @ k.transpose(-1, -2)) * _weights(decay, log_i, m_t)
    w_in = torch.exp(decay + m_in.unsqueeze(-1) - m_t)
    num = scores @ v + w_in.unsqueeze(-1) * (q @ memory_in)
    den = scores.sum(-1) + w_in * (q * norm_in.unsqueeze(-2)).sum(-1)
    return num / _floored(den, m_t).unsqueeze(-1), den, m_t


def _stabilisers(decay: torch.Tensor, log_i: torch.Tensor, m_in: torch.Tensor) -> torch.Tensor:
    """Each position's m_t: the largest of its log weights, F_t - F_s + i~_s over its chunk's
    positions s <= t (a running maximum of i~_s - F_s) and F_t + m_in for the entering memory."""
    return torch.maximum(decay + (log_i - decay).cummax(-1).values, decay + m_in.unsqueeze(-1))


def _weights(decay: torch.Tensor, log_i: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """(..., t, s): exp(F_t - F_s + i~_s - m_t) where s <= t, else 0."""
    size = decay.size(-1)
    later = torch.ones(size, size, dtype=torch.bool, device=decay.device).triu(1)
    log_w = (decay - m_t).unsqueeze(-1) + (log_i - decay).unsqueeze(-2)
    return torch.exp(log_w.masked_fill_(later, float("-inf")))


def _floored(den: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """max(|q^T n|, 1), stabilised."""
    return torch.maximum(den.abs(), torch.exp(-m_t))


def _chunks(q, k, v, log_i, log_f, memory, norm, m):
    """The chunkwise form on (B, K, N, s, ...) inputs -> h~ (B, K, N, s, d), its denominators,
    the stabilisers m_t, the final state and the states entering each chunk (stacked on axis 2)."""
    decay = log_f.cumsum(-1)                               # F_t within each chunk
    own = _own(k, v, log_i, decay)
    entering = [x.new_empty(x.size(0), x.size(1), q.size(2), *x.shape[2:]) for x in (memory, norm, m)]
    for n, (total, *parts) in enumerate(zip(decay[..., -1].unbind(2), *(t.unbind(2) for t in own))):
        for kept, x in zip(entering, (memory, norm, m)):
            kept[:, :, n] = x
        memory, norm, m = _carry(total, parts, memory, norm, m)
    memory_in, norm_in, m_in = entering
    h, den, m_t = _read(q, k, v, log_i, decay, memory_in, norm_in, m_in)
    return h, den, m_t, (memory, norm, m), (memory_in, norm_in, m_in)


class MLSTMChunks(torch.autograd.Function):
    """:func:`_chunks` with its backward pass written out: (B, K, N, s, d) q, k, v, (B, K, N, s)
    i~ and log f, the state -> h~ and the final memory, norm and m. It keeps the inputs, the
    outputs, each position's denominator and stabiliser and the state entering each chunk;
    going back, it computes each chunk's (s, s) weights and scores again and nothing else of
    the forward pass (the products with the memory it reads and with the values it weighs
    follow from h~ and the denominator), ``GROUP`` chunks at a time. Under autocast the
    products run with the forward's settings.

    The m inside are constants to the gradients (the module's note); the ends are not: the
    state in and out stands for its memory and norm times exp(m), so a gradient reaches the
    first m through the memory and norm it scales, and the last m's through the ones it
    divides (and through its own recursion, max(log f + m, i~), back to the gates)."""

    GROUP = 16

    @staticmethod
    def forward(ctx, q, k, v, log_i, log_f, memory, norm, m):
        h, den, m_t, final, entering = _chunks(q, k, v, log_i, log_f, memory, norm, m)
        ctx.save_for_backward(q, k, v, log_i, log_f, h, den, m_t, *entering, *final)
        kind = q.device.type
        ctx.autocast = kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
        ctx.set_materialize_grads(False)      # an unused output's gradient comes as None
        return h, *final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_h, d_memory, d_norm, d_m):
        q, k, v, log_i, log_f, h, den, m_t, memory_in, norm_in, m_in, memory_end, norm_end, m_end = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        ends = d_memory is not None or d_norm is not None or d_m is not None     # the final state was used
        d_h = torch.zeros_like(h) if d_h is None else d_h
        d_memory = torch.zeros_like(memory_end) if d_memory is None else d_memory
        d_norm = torch.zeros_like(norm_end) if d_norm is None else d_norm
        # the last m, through the memory and norm it divides
        d_m = (0 if d_m is None else d_m) - (d_memory * memory_end).sum((-1, -2)) - (d_norm * norm_end).sum(-1)
        decay = log_f.cumsum(-1)
        total = decay[..., -1]
        m_next = torch.cat([m_in[:, :, 1:], m_end.unsqueeze(2)], 2)            # m after each chunk
        keep = torch.exp(total + m_in - m_next)
        d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_i, d_f = torch.empty_like(log_i), torch.empty_like(log_f)
        chunks = q.size(2)
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            for start in reversed(range(0, chunks, MLSTMChunks.GROUP)):
                g = slice(start, min(start + MLSTMChunks.GROUP, chunks))
                parts = _read_backward(q[:, :, g], k[:, :, g], v[:, :, g], log_i[:, :, g], decay[:, :, g],
                                       memory_in[:, :, g], norm_in[:, :, g], m_in[:, :, g], h[:, :, g],
                                       den[:, :, g], m_t[:, :, g], d_h[:, :, g])
                d_q[:, :, g], d_k[:, :, g], d_v[:, :, g], d_i[:, :, g], d_decay, read_memory, read_norm = parts
                # the memory carried: back one chunk at a time (B, K, d, d each)
                after_memory, after_norm = torch.empty_like(memory_in[:, :, g]), torch.empty_like(norm_in[:, :, g])
                d_total = torch.empty_like(total[:, :, g])
                for j in range(g.stop - g.start - 1, -1, -1):
                    n = g.start + j
                    after_memory[:, :, j], after_norm[:, :, j] = d_memory, d_norm
                    d_total[:, :, j] = keep[:, :, n] * ((d_memory * memory_in[:, :, n]).sum((-1, -2))
                                                        + (d_norm * norm_in[:, :, n]).sum(-1))
                    d_memory = keep[:, :, n, None, None] * d_memory + read_memory[:, :, j]
                    d_norm = keep[:, :, n, None] * d_norm + read_norm[:, :, j]
                # each chunk's own contribution to the memory after it
                d_k[:, :, g], d_v[:, :, g], d_i[:, :, g], d_decay, d_total = _own_backward(
                    k[:, :, g], v[:, :, g], log_i[:, :, g], decay[:, :, g], m_next[:, :, g], after_memory, after_norm,
                    d_k[:, :, g], d_v[:, :, g], d_i[:, :, g], d_decay, d_total)
                d_decay[..., -1] += d_total
                d_f[:, :, g] = d_decay.flip(-1).cumsum(-1).flip(-1)      # decay is log f's running sum
        # the first m, through the memory and norm it scales; the last m's recursion
        d_m0 = (d_memory * memory_in[:, :, 0]).sum((-1, -2)) + (d_norm * norm_in[:, :, 0]).sum(-1)
        if ends:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (log_i, log_f, m_in[:, :, 0])]
                found = torch.autograd.grad(_last_m(*leaves), leaves, d_m)
            d_i, d_f, d_m0 = d_i + found[0], d_f + found[1], d_m0 + found[2]
        return d_q, d_k, d_v, d_i, d_f, d_memory, d_norm, d_m0


def _read_backward(q, k, v, log_i, decay, memory_in, norm_in, m_in, h, den, m_t, d_h):
    """Gradients of :func:`_read`'s h~ for a group of chunks, m constant: q, k, v, i~, the
    running decay, and the entering memory and norm."""
    r = _floored(den, m_t)
    weights = _weights(decay, log_i, m_t)                                           # D (t, s)
    qk = q @ k.transpose(-1, -2)
    scores = qk * weights                                                           # P
    d_num = d_h / r.unsqueeze(-1)
    dh_h = (d_h * h).sum(-1)                                   # <d num, num> as well
    d_den = -dh_h / r * torch.sign(den) * (den.abs() > torch.exp(-m_t)).to(den.dtype)
    d_scores = d_num @ v.transpose(-1, -2) + d_den.unsqueeze(-1)
    e = d_scores * scores                                      # gradient of each log weight
    d_qk = d_scores * weights
    w_in = torch.exp(decay + m_in.unsqueeze(-1) - m_t)
    d_q = d_qk @ k + w_in.unsqueeze(-1) * (d_num @ memory_in.transpose(-1, -2)
                                           + d_den.unsqueeze(-1) * norm_in.unsqueeze(-2))
    d_k = d_qk.transpose(-1, -2) @ q
    d_v = scores.transpose(-1, -2) @ d_num
    q_in = q * w_in.unsqueeze(-1)
    d_memory_in = q_in.transpose(-1, -2) @ d_num
    d_norm_in = (q_in * d_den.unsqueeze(-1)).sum(-2)
    rows, cols = e.sum(-1), e.sum(-2)
    d_log_w = dh_h + d_den * den - rows        # w_in's log: <d num, w q^T C> + d den w q.n, by what h~ and den hold
    return d_q, d_k, d_v, cols, rows - cols + d_log_w, d_memory_in, d_norm_in


def _own_backward(k, v, log_i, decay, m_next, d_memory, d_norm, d_k, d_v, d_i, d_decay, d_total):
    """Adds the gradients through each chunk's own contribution to the state after it
    (sum over s of u_s k_s v_s^T, u_s = exp(F_last - F_s + i~_s - m_after)), given the
    gradients of that state."""
    u = torch.exp(_own_weights(log_i, decay) - m_next.unsqueeze(-1))
    to_k = v @ d_memory.transpose(-1, -2) + d_norm.unsqueeze(-2)                   # d C v_s + d n
    d_k = d_k + u.unsqueeze(-1) * to_k
    d_v = d_v + u.unsqueeze(-1) * (k @ d_memory)
    d_log_u = u * (k * to_k).sum(-1)
    return d_k, d_v, d_i + d_log_u, d_decay - d_log_u, d_total + d_log_u.sum(-1)


def _last_m(log_i: torch.Tensor, log_f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The stabiliser after the last chunk, as :func:`_chunks` reaches it."""
    decay = log_f.cumsum(-1)
    m_own = _own_weights(log_i, decay).amax(-1)
    for total, m_c in zip(decay[..., -1].unbind(2), m_own.unbind(2)):
        m = torch.maximum(total + m, m_c)
    return m


def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_i: torch.Tensor, log_f: torch.Tensor,
                    memory: torch.Tensor, norm: torch.Tensor, m: torch.Tensor, chunk: int = 64):
    """Every position's h~ = q^T C / max(|q^T n|, exp(-m)) of the stabilised mLSTM recurrence.

    ``q``, ``k`` (scaled), ``v`` (B, K, T, d); ``log_i`` (i~) and ``log_f`` (log sigmoid f~)
    (B, K, T); the state before the first position: ``memory`` (B, K, d, d), ``norm``
    (B, K, d), ``m`` (B, K). Returns h~ (B, K, T, d) and the state after the last position.

    With F_t the sum of log f over a chunk's positions up to t, a position t of a chunk reads
    s <= t of the same chunk with weight exp(F_t - F_s + i~_s) and the memory entering the
    chunk with exp(F_t + m_in); each row is divided by its largest weight's exp (its m_t,
    the same number the step-by-step recursion reaches)."""
    batch, heads, steps, d = q.shape
    chunks = -(-steps // chunk)
    size = -(-steps // chunks)          # chunks of equal size, at most ``chunk``: the least padding
    pad = chunks * size - steps
    if pad:      # f = 1 and i = 0 past the end: the state passes unchanged
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_i, log_f = F.pad(log_i, (0, pad), value=SHUT), F.pad(log_f, (0, pad))
    q, k, v = (t.reshape(batch, heads, chunks, size, d) for t in (q, k, v))
    log_i, log_f = log_i.reshape(batch, heads, chunks, size), log_f.reshape(batch, heads, chunks, size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, log_i, log_f, memory, norm, m)):
        h, *state = MLSTMChunks.apply(q, k, v, log_i, log_f, memory, norm, m)
    else:
        h, _, _, state, _ = _chunks(q, k, v, log_i, log_f, memory, norm, m)
    return h.reshape(batch, heads, chunks * size, d)[:, :, :steps], tuple(state)
