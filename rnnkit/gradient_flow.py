"""Gradient flow through time: how strongly a loss reaches back to earlier hidden states.

For a loss that starts at time step ``end``, the curve is the norm of dL/dh_t (every
layer's h_t together, the forward direction of a bidirectional layer) at distance
``end - t`` from it, averaged over the sequences of a batch. A vanilla RNN's curve falls
geometrically (vanishing gradients); an LSTM's or GRU's stays up. The decay rate is the
factor per step of a least-squares fit of log(norm) against distance.

Fused layers keep their hidden states inside the kernel, so the measurement swaps every
fused layer of the model for an explicit twin with the same weights (they compute the
same function) and records the states as the twin produces them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from rnnkit.models.cells import ExplicitRNN

_CELL_OF_MODE = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


class GradientFlow(NamedTuple):
    distances: list[int]    # 0: the step where the loss starts
    norms: list[float]      # mean over the batch of ||dL/dh|| at that distance
    decay: float            # fitted factor per step: norm(d + 1) ~ decay * norm(d)

    def summary(self) -> dict[str, float]:
        """What ``metrics.jsonl`` keeps of the curve."""
        return {"decay": self.decay, "grad_norm_at_loss": self.norms[0], "grad_norm_farthest": self.norms[-1],
                "distance": self.distances[-1]}


def fit_decay(norms: list[float]) -> float:
    """exp(slope) of a least-squares line through (distance, log norm), over positive norms."""
    points = [(d, math.log(n)) for d, n in enumerate(norms) if n > 0 and math.isfinite(n)]
    if len(points) < 2:
        return float("nan")
    mx = sum(d for d, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((d - mx) ** 2 for d, _ in points)
    return math.exp(sum((d - mx) * (y - my) for d, y in points) / var)


def explicit_twin(rnn: nn.RNNBase) -> ExplicitRNN:
    """An explicit layer computing what the fused ``rnn`` computes, with its weights."""
    twin = ExplicitRNN(_CELL_OF_MODE[rnn.mode], rnn.input_size, rnn.hidden_size, rnn.num_layers,
                       rnn.dropout, rnn.bidirectional)
    twin.load_state_dict(rnn.state_dict())
    weight = next(rnn.parameters())
    return twin.to(device=weight.device, dtype=weight.dtype).train(rnn.training)


@contextmanager
def explicit_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every fused recurrent layer of ``model`` by its explicit twin."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RNNBase):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, explicit_twin(module))
            swapped.append((parent, attr, module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def measure(model: nn.Module, rnn_path: str, loss_fn: Callable[[], torch.Tensor], end: int) -> GradientFlow:
    """Run ``loss_fn`` (which uses ``model``) with the layer at ``rnn_path`` recording its
    states, in eval mode (no dropout), and return the curve up to distance ``end``."""
    was_training = model.training
    model.eval()
    try:
        with explicit_layers(model), torch.enable_grad():
            rnn = model.get_submodule(rnn_path)
            rnn.trace = {}
            try:
                loss = loss_fn()
                trace = rnn.trace
            finally:
                rnn.trace = None
            layers = [trace[k] for k in sorted(trace)]
            flat = [h for states in layers for h in states]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        model.train(was_training)
    steps = len(layers[0])
    squared = [0.0] * steps
    for i, (h, g) in enumerate(zip(flat, grads)):
        if g is not None:
            squared[i % steps] = squared[i % steps] + g.double().pow(2).sum(-1)
    norms = [float(torch.as_tensor(s).sqrt().mean()) for s in squared]
    curve = [norms[end - d] for d in range(min(end, steps - 1) + 1)]
    return GradientFlow(list(range(len(curve))), curve, fit_decay(curve))
