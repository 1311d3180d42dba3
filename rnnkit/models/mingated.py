"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Their gates read the input only, never the previous state, so the recurrence is linear in
the state, h_t = a_t * h_(t-1) + b_t, and a whole sequence is one scan
(:mod:`rnnkit.models.scan`):

- minGRU: z_t = sigmoid(W_z x_t), h~_t = g(W_h x_t), h_t = (1 - z_t) h_(t-1) + z_t h~_t
- minLSTM: f_t = sigmoid(W_f x_t), i_t = sigmoid(W_i x_t), h~_t = g(W_h x_t); with
  f'_t = f_t / (f_t + i_t) and i'_t = i_t / (f_t + i_t), h_t = f'_t h_(t-1) + i'_t h~_t

g(x) = x + 1/2 for x >= 0 and sigmoid(x) below: the paper's activation for the candidate,
positive and continuous, which keeps every state positive (their log-space scan needs it;
rnnkit's scan does not, but the cell is the paper's).
"""
from __future__ import annotations

import torch
from torch import nn

from rnnkit.models.products import run_linear
from rnnkit.models.scan import LinearCell, widen


def g(x: torch.Tensor) -> torch.Tensor:
    """The candidate's activation: x + 1/2 where x >= 0, sigmoid(x) below."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


class MinGRUCell(LinearCell):
    """One minGRU layer-direction; ``proj`` maps x to [candidate, update gate]."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(input_size, 2 * hidden_size)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t = 1 - z_t and b_t = z_t g(h~_t) for every position of ``x`` (..., input)."""
        cand, gate = widen(run_linear(self.proj, x)).chunk(2, -1)
        z = torch.sigmoid(gate)
        return 1 - z, z * g(cand)

    def sequential(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations one position at a time: ``x`` (B, T, input) -> h (B, T, H)."""
        w_h, w_z = self.proj.weight.chunk(2, 0)
        b_h, b_z = self.proj.bias.chunk(2, 0)
        out = []
        for t in range(x.size(1)):
            z = torch.sigmoid(x[:, t] @ w_z.t() + b_z)
            h = (1 - z) * h + z * g(x[:, t] @ w_h.t() + b_h)
            out.append(h)
        return torch.stack(out, 1), h


class MinLSTMCell(LinearCell):
    """One minLSTM layer-direction; ``proj`` maps x to [forget gate, input gate, candidate]."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(input_size, 3 * hidden_size)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t = f'_t and b_t = i'_t g(h~_t), the gates normalised to sum to one."""
        f, i, cand = widen(run_linear(self.proj, x)).chunk(3, -1)
        # f / (f + i) with f = sigmoid(f_pre), i = sigmoid(i_pre), in a form that cannot overflow
        log_f, log_i = -nn.functional.softplus(-f), -nn.functional.softplus(-i)
        forget = torch.sigmoid(log_f - log_i)
        return forget, (1 - forget) * g(cand)

    def sequential(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equations one position at a time."""
        w_f, w_i, w_h = self.proj.weight.chunk(3, 0)
        b_f, b_i, b_h = self.proj.bias.chunk(3, 0)
        out = []
        for t in range(x.size(1)):
            f = torch.sigmoid(x[:, t] @ w_f.t() + b_f)
            i = torch.sigmoid(x[:, t] @ w_i.t() + b_i)
            h = f / (f + i) * h + i / (f + i) * g(x[:, t] @ w_h.t() + b_h)
            out.append(h)
        return torch.stack(out, 1), h
