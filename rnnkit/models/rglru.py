"""The real-gated linear recurrent unit, RG-LRU (De et al. 2024, Griffin and Hawk).

The layer's input x_t is first projected to the state's width, u_t = W_u x_t (in Hawk the
recurrent block's branch does this before its convolution). Then, per channel:

    r_t = sigmoid(W_a u_t + b_a)                  recurrence gate
    i_t = sigmoid(W_x u_t + b_x)                  input gate
    a_t = a^(c r_t),  a = sigmoid(Lambda),  c = 8
    h_t = a_t * h_(t-1) + sqrt(1 - a_t^2) * (i_t * u_t)

a_t is computed in log space, log a_t = -c r_t softplus(-Lambda), and Lambda starts where a^c
is uniform in [0.9, 0.999], as the paper initialises it. The recurrence is linear in h, so a
sequence is one scan (:mod:`rnnkit.models.scan`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.blocks import CausalConv, _final, _flipper, _window_split
from rnnkit.models.products import run_linear
from rnnkit.models.scan import LinearCell, widen

C = 8.0


class RGLRUCell(LinearCell):
    """One RG-LRU layer-direction: ``inp`` (x -> u), ``gates`` (u -> [r, i]), ``log_a`` (Lambda)."""

    def __init__(self, input_size: int, hidden_size: int, project: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        # in Hawk's block the branch's own projection and convolution come first: no second one
        self.inp = nn.Linear(input_size, hidden_size) if project else nn.Identity()
        self.gates = nn.Linear(hidden_size, 2 * hidden_size)
        self.log_a = nn.Parameter(torch.empty(hidden_size))
        self.reset_lambda()

    def reset_lambda(self) -> None:
        """Lambda such that a^c is uniform in [0.9, 0.999] (Griffin's initialisation)."""
        with torch.no_grad():
            a = torch.empty_like(self.log_a).uniform_(0.9, 0.999) ** (1 / C)
            self.log_a.copy_(torch.log(a) - torch.log1p(-a))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t and b_t = sqrt(1 - a_t^2) i_t u_t for every position of ``x`` (..., input)."""
        u = run_linear(self.inp, x)
        r, i = torch.sigmoid(widen(run_linear(self.gates, u))).chunk(2, -1)
        u = widen(u)
        log_a = -C * r * F.softplus(-self.log_a)
        # sqrt(1 - a^2) = sqrt(-expm1(2 log a)), exact near a = 1 (ONNX has no expm1: a graph
        # computes 1 - exp); bounded away from 0 so that its derivative stays finite where a
        # gate saturates
        rest = 1 - torch.exp(2 * log_a) if torch.onnx.is_in_onnx_export() else -torch.expm1(2 * log_a)
        scale = torch.sqrt(rest.clamp_min(1e-12))
        return torch.exp(log_a), scale * i * u

    def sequential(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations one position at a time."""
        a = torch.sigmoid(self.log_a)
        out = []
        for t in range(x.size(1)):
            u = self.inp(x[:, t])
            r, i = torch.sigmoid(self.gates(u)).chunk(2, -1)
            a_t = a ** (C * r)
            h = a_t * h + torch.sqrt(1 - a_t ** 2) * (i * u)
            out.append(h)
        return torch.stack(out, 1), h


class HawkBlock(nn.Module):
    """Hawk's recurrent block around an RG-LRU (De et al. 2024, the temporal-mixing block of
    Hawk and Griffin), in place of a bare cell: two branches from the layer's input x_t,

        g_t = GeLU(W_g x_t)                                   the gate branch
        u_t = W_u x_t,  c_t = sum_j w_j * u_(t-3+j) + b       a causal depthwise convolution of width 4
        h_t = RG-LRU(c_t) from h_(t-1)                        (no projection of its own)
        y_t = W_o (g_t * h_t)

    The state is [y, h, the last three u], flat: the convolution's window rides with the
    recurrent state, so a step, a carried TBPTT state and a padded batch see it as any state."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.state_size = (CausalConv.width + 1) * hidden_size     # y, h, and the window's three inputs u
        self.gate = nn.Linear(input_size, hidden_size)
        self.inp = nn.Linear(input_size, hidden_size)
        self.conv = CausalConv(hidden_size)
        self.rglru = RGLRUCell(hidden_size, hidden_size, project=False)
        self.out = nn.Linear(hidden_size, hidden_size)

    def _split(self, state: torch.Tensor):
        """state -> h (..., H), the window (..., 3, H)."""
        return _window_split(state[..., self.hidden_size:], self.hidden_size)

    def run(self, x: torch.Tensor, state: torch.Tensor, held: torch.Tensor | None,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        flip = _flipper(reverse)
        x, held = flip(x), None if held is None else flip(held)
        h0, window = self._split(state)
        u = widen(run_linear(self.inp, x))
        if held is not None:      # padding reads as zeros (a reversed row's padding comes first)
            u = u.masked_fill(held, 0.0)
        conv, full = self.conv.run(u, window)
        h, _ = self.rglru.run(conv, h0, held, False)
        y = run_linear(self.out, F.gelu(widen(run_linear(self.gate, x))) * h)
        return flip(y), _final(held, self.conv, full, y, h)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, window = self._split(state)
        c, window = self.conv.step(widen(self.inp(x)), window)
        _, h = self.rglru.step(c, h)
        y = self.out(F.gelu(widen(self.gate(x))) * h)
        return y, torch.cat([y, h, window.flatten(1)], -1)

    def sequential(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's equations one position at a time (the RG-LRU's own loop inside)."""
        h, window = self._split(state)
        us = list(window.unbind(1)) + [self.inp(x[:, t]) for t in range(x.size(1))]
        cs = [self.conv.sequential(us[:t + CausalConv.width]) for t in range(x.size(1))]
        hs, h = self.rglru.sequential(torch.stack(cs, 1), h)
        y = self.out(F.gelu(self.gate(x)) * hs)
        return y, torch.cat([y[:, -1], h, torch.stack(us[-(CausalConv.width - 1):], 1).flatten(1)], -1)
