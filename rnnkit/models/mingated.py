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
import torch.nn.functional as F
from torch import nn

from rnnkit.models.products import run_linear
from rnnkit.models.scan import LinearCell, widen


def g(x: torch.Tensor) -> torch.Tensor:
    """The candidate's activation: x + 1/2 where x >= 0, sigmoid(x) below."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def _g(x: torch.Tensor) -> torch.Tensor:
    """g(x) in two fresh tensors instead of four: sigmoid(min(x, 0)) + max(x, 0)."""
    return x.clamp(max=0).sigmoid_().add_(x.clamp(min=0))


def _g_slope(x: torch.Tensor) -> torch.Tensor:
    """g'(x): 1 where x >= 0, sigmoid(x) (1 - sigmoid(x)) below."""
    s = x.clamp(max=0).sigmoid_()
    return s.sub_(s * s).masked_fill_(x >= 0, 1.0)


class _MinGRUGates(torch.autograd.Function):
    """(candidate, gate) pre-activations -> a = 1 - z and b = z g(candidate), with
    z = sigmoid(gate). Autograd would keep a graph of seven element-wise steps and their
    intermediates over the whole sequence; this keeps the pre-activations alone and works
    the gradients out in a few passes (training time is mostly such passes, beside the
    projection)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cand, gate = pre.chunk(2, -1)
        z = torch.sigmoid(gate)
        ctx.save_for_backward(pre)
        return torch.sub(1, z), _g(cand).mul_(z)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        (pre,) = ctx.saved_tensors
        cand, gate = pre.chunk(2, -1)
        z = torch.sigmoid(gate)
        grad = torch.empty_like(pre)
        d_cand, d_gate = grad.chunk(2, -1)
        # b = z g(c): db/dc = z g'(c); a = 1 - z, b = z g(c): d/dz = g(c) gb - ga, dz = z (1 - z)
        torch.mul(_g_slope(cand).mul_(z), grad_b, out=d_cand)
        torch.mul(_g(cand).mul_(grad_b).sub_(grad_a), z - z * z, out=d_gate)
        return grad


class _MinLSTMGates(torch.autograd.Function):
    """(forget, input, candidate) pre-activations -> a = f' and b = (1 - f') g(candidate),
    f' = f / (f + i) = sigmoid(log sigmoid(f_pre) - log sigmoid(i_pre)), a form that cannot
    overflow; the gradients from the saved pre-activations, as for minGRU."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, i, cand = pre.chunk(3, -1)
        forget = F.logsigmoid(f).sub_(F.logsigmoid(i)).sigmoid_()
        ctx.save_for_backward(pre)
        return forget, _g(cand).mul_(1 - forget)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        (pre,) = ctx.saved_tensors
        f, i, cand = pre.chunk(3, -1)
        forget = F.logsigmoid(f).sub_(F.logsigmoid(i)).sigmoid_()
        grad = torch.empty_like(pre)
        d_f, d_i, d_cand = grad.chunk(3, -1)
        torch.mul(_g_slope(cand).mul_(1 - forget), grad_b, out=d_cand)
        # u = log sigmoid(f) - log sigmoid(i), a = sigmoid(u), b = (1 - a) g(c):
        # du = (ga - gb g(c)) a (1 - a); du/df = sigmoid(-f), du/di = -sigmoid(-i)
        d_u = _g(cand).mul_(grad_b).neg_().add_(grad_a).mul_(forget - forget * forget)
        torch.mul(torch.sigmoid(-f), d_u, out=d_f)
        torch.mul(torch.sigmoid(-i), d_u, out=d_i).neg_()
        return grad


def chrono_biases(width: int, longest: int) -> torch.Tensor:
    """log u, u uniform in [1, longest - 1]: a gate bias b with sigmoid(b) = 1 - 1/(1 + u), a
    decay that keeps a state over about 1 + u steps (Tallec & Ollivier 2018, "Can recurrent
    neural networks warp time?": the LSTM's forget bias, here the scan's decay)."""
    return torch.log(torch.empty(width).uniform_(1.0, max(1.0, longest - 1.0)))


class MinGRUCell(LinearCell):
    """One minGRU layer-direction; ``proj`` maps x to [candidate, update gate]. ``chrono`` > 0:
    the update gate's bias by the chrono initialisation (decay a = 1 - z = sigmoid(-bias))."""

    def __init__(self, input_size: int, hidden_size: int, chrono: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(input_size, 2 * hidden_size)
        if chrono:
            with torch.no_grad():
                self.proj.bias[hidden_size:] = -chrono_biases(hidden_size, chrono)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t = 1 - z_t and b_t = z_t g(h~_t) for every position of ``x`` (..., input)."""
        return _MinGRUGates.apply(widen(run_linear(self.proj, x)))

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
    """One minLSTM layer-direction; ``proj`` maps x to [forget gate, input gate, candidate].
    ``chrono`` > 0: forget bias b and input bias -b by the chrono initialisation (the decay
    f' = sigmoid(log sigmoid(b) - log sigmoid(-b)) = sigmoid(b))."""

    def __init__(self, input_size: int, hidden_size: int, chrono: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(input_size, 3 * hidden_size)
        if chrono:
            with torch.no_grad():
                b = chrono_biases(hidden_size, chrono)
                self.proj.bias[:hidden_size], self.proj.bias[hidden_size:2 * hidden_size] = b, -b

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t = f'_t and b_t = i'_t g(h~_t), the gates normalised to sum to one."""
        return _MinLSTMGates.apply(widen(run_linear(self.proj, x)))

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
