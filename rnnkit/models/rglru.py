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

from rnnkit.models.scan import LinearCell, widen

C = 8.0


class RGLRUCell(LinearCell):
    """One RG-LRU layer-direction: ``inp`` (x -> u), ``gates`` (u -> [r, i]), ``log_a`` (Lambda)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size)
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
        u = self.inp(x)
        r, i = torch.sigmoid(widen(self.gates(u))).chunk(2, -1)
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
