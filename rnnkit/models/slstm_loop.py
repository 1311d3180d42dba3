"""sLSTM's recurrence, one position (:func:`_slstm_update`, which the step form and an exported
graph's loop run) and a whole sequence with its backward pass written out (:class:`SLSTMRun`,
the parallel form's loop): the equations are in :mod:`rnnkit.models.xlstm`."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _slstm_recurrent(h: torch.Tensor, rec: torch.Tensor, heads: int) -> torch.Tensor:
    """R h for (N, H) -> (N, 4H) in the gates' order, each gate's units head by head."""
    d = h.size(1) // heads
    r = torch.bmm(h.reshape(-1, heads, d).transpose(0, 1), rec.transpose(1, 2))      # (K, N, 4d)
    return r.reshape(heads, -1, 4, d).permute(1, 2, 0, 3).reshape(-1, 4 * heads * d)


def _slstm_update(pre: torch.Tensor, state: torch.Tensor, rec: torch.Tensor, heads: int) -> torch.Tensor:
    """The stabilised update from the input's pre-activations ``pre`` (N, 4H) and the state
    [h, c, n, m] (N, 4H). Slices, positive axes and no batch size read from a shape: it also
    runs inside an exported graph's loop."""
    hidden = pre.size(1) // 4
    return _slstm_gated(pre + _slstm_recurrent(state[:, :hidden], rec, heads), state)


def _slstm_gated(g: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """:func:`_slstm_update` from the gates' whole pre-activations ``g`` (N, 4H), the
    recurrent part included."""
    hidden = g.size(1) // 4
    c, n, m = state[:, hidden:2 * hidden], state[:, 2 * hidden:3 * hidden], state[:, 3 * hidden:]
    i, f, z, o = g[:, :hidden], g[:, hidden:2 * hidden], g[:, 2 * hidden:3 * hidden], g[:, 3 * hidden:]
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    i, f = torch.exp(i - m_new), torch.exp(log_f + m - m_new)
    c, n = f * c + i * torch.tanh(z), f * n + i
    return torch.cat([torch.sigmoid(o) * c / n, c, n, m_new], 1)


class SLSTMRun(torch.autograd.Function):
    """sLSTM over a sequence with its backward written out: (pre (B, T, 4H), state (B, 4H),
    rec, held (B, T, 1) or None) -> outputs (B, T, H), final state. Autograd through the
    loop keeps a dozen tensors per position and runs one node per operation; this keeps each
    position's state and gate pre-activations (8H numbers), computes the gates' values again
    from them going back, and takes the recurrent weights' gradient in one product for the
    whole sequence. The gradients are those of :func:`_slstm_update` to rounding (max's ties
    split as torch's). Both loops run scripted (compiled once per process on first use): a
    position is some 15 small operations going forward and 40 going back, and the
    interpreter dispatches them for less than Python does."""

    @staticmethod
    def forward(ctx, pre, state, rec, held, heads: int, reverse: bool):
        hidden = pre.size(2) // 4
        states, gates = _loop("forward")(pre, state, rec, held, heads, reverse)
        ctx.save_for_backward(states, gates, rec, held)
        ctx.heads, ctx.reverse, ctx.pre_dtype = heads, reverse, pre.dtype
        out = states[1:, :, :hidden].transpose(0, 1)
        return (out.flip(1) if reverse else out).contiguous(), states[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_final):
        states, gates, rec, held = ctx.saved_tensors
        heads, steps, hidden = ctx.heads, gates.size(0), gates.size(2) // 4
        d_state = torch.zeros_like(states[0]) if d_final is None else d_final.to(states.dtype).clone()
        d_out = None if d_out is None else d_out.to(states.dtype)
        d_pre, d_state = _loop("backward")(states, gates, rec, held, d_out, d_state, heads, ctx.reverse)
        # the recurrent weights' gradient, every position at once: sum_t dg_t^T h_(t-1), head by head
        d = hidden // heads
        ordered = d_pre.flip(1) if ctx.reverse else d_pre               # position k of the run
        dr = ordered.reshape(-1, steps, 4, heads, d).permute(3, 2, 4, 0, 1).reshape(heads, 4 * d, -1)
        h_prev = states[:-1, :, :hidden].reshape(steps, -1, heads, d).permute(2, 1, 0, 3).reshape(heads, -1, d)
        d_rec = torch.bmm(dr, h_prev)
        return d_pre.to(ctx.pre_dtype), d_state, d_rec.to(rec.dtype), None, None, None


def _run_forward(pre: torch.Tensor, state: torch.Tensor, rec: torch.Tensor, held: Optional[torch.Tensor],
                 heads: int, reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`SLSTMRun`'s forward loop -> every state (T + 1, B, 4H; states[k] after k steps
    of the run) and every position's gate pre-activations (T, B, 4H), in the run's order."""
    steps, hidden = pre.size(1), pre.size(2) // 4
    states = state.new_empty([steps + 1, state.size(0), state.size(1)])
    gates = state.new_empty([steps, state.size(0), state.size(1)])
    states[0] = state
    for k in range(steps):
        t = steps - 1 - k if reverse else k
        torch.add(pre[:, t], _slstm_recurrent(states[k, :, :hidden], rec, heads), out=gates[k])
        new = _slstm_gated(gates[k], states[k])
        states[k + 1] = new if held is None else torch.where(held[:, t], states[k], new)
    return states, gates


def _run_backward(states: torch.Tensor, gates: torch.Tensor, rec: torch.Tensor, held: Optional[torch.Tensor],
                  d_out: Optional[torch.Tensor], d_state: torch.Tensor, heads: int,
                  reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`SLSTMRun`'s backward loop -> the gradient of the pre-activations (B, T, 4H)
    and of the state the run started from."""
    steps, hidden = gates.size(0), gates.size(2) // 4
    d_pre = states.new_empty([states.size(1), steps, 4 * hidden])      # every position written below
    d = hidden // heads
    rec = rec.to(states.dtype)
    for k in range(steps - 1, -1, -1):
        t = steps - 1 - k if reverse else k
        prev, g = states[k], gates[k]
        if d_out is not None:
            d_state[:, :hidden] += d_out[:, t]
        c, n, m = prev[:, hidden:2 * hidden], prev[:, 2 * hidden:3 * hidden], prev[:, 3 * hidden:]
        i_raw, f_raw = g[:, :hidden], g[:, hidden:2 * hidden]
        z_raw, o_raw = g[:, 2 * hidden:3 * hidden], g[:, 3 * hidden:]
        log_f = F.logsigmoid(f_raw)
        carried = log_f + m
        m_new = torch.maximum(carried, i_raw)
        ip, fp = torch.exp(i_raw - m_new), torch.exp(carried - m_new)
        z, o = torch.tanh(z_raw), torch.sigmoid(o_raw)
        c_new, n_new = fp * c + ip * z, fp * n + ip
        dh, dc = d_state[:, :hidden], d_state[:, hidden:2 * hidden]
        dn, dm = d_state[:, 2 * hidden:3 * hidden], d_state[:, 3 * hidden:]
        ratio = c_new / n_new
        dc = dc + dh * o / n_new
        dn = dn - dh * o * ratio / n_new
        a = (dc * c + dn * n) * fp             # d/d(log f + m - m_new) through f's factor
        b = (dc * z + dn) * ip                 # d/d(i~ - m_new) through i's factor
        dm_new = dm - a - b
        first = (carried > i_raw).to(g.dtype) + 0.5 * (carried == i_raw).to(g.dtype)
        d_carried = a + dm_new * first
        dg = torch.cat([b + dm_new * (1 - first), d_carried * torch.sigmoid(-f_raw),
                        dc * ip * (1 - z * z), dh * ratio * o * (1 - o)], 1)
        dr = dg.reshape(-1, 4, heads, d).permute(2, 0, 1, 3).reshape(heads, -1, 4 * d)       # (K, B, 4d)
        dh_prev = torch.bmm(dr, rec).transpose(0, 1).reshape(-1, hidden)
        d_prev = torch.cat([dh_prev, dc * fp, dn * fp, d_carried], 1)
        if held is not None:                   # a held position passed its state through
            d_prev = torch.where(held[:, t], d_state, d_prev)
            dg = dg.masked_fill(held[:, t], 0.0)
        d_pre[:, t] = dg
        d_state = d_prev
    return d_pre, d_state


@functools.cache
def _loop(which: str):
    """:func:`_run_forward` or :func:`_run_backward`, scripted once per process on first use."""
    return torch.jit.script({"forward": _run_forward, "backward": _run_backward}[which])
