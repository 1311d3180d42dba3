"""Optimizers, their parameter groups, and the weight averages (NT-ASGD, EMA) beside them."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from rnnkit.config import Config, ConfigError


def parameter_groups(cfg: Config, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups. With ``train.layer_lr_decay`` or ``train.unfreeze_every``
    one per layer group of the model (its ``layer_groups()``, input to output), each with its
    ``depth`` below the top and its learning-rate multiplier ``decay ** depth``."""
    t = cfg.train
    if t.layer_lr_decay is None and t.unfreeze_every is None:
        return [{"params": [q for q in model.parameters() if q.requires_grad], "lr_mult": 1.0, "depth": 0}]
    if not hasattr(model, "layer_groups"):
        key = "train.layer_lr_decay" if t.layer_lr_decay is not None else "train.unfreeze_every"
        raise ConfigError(key, f"task '{cfg.task}' does not divide its model into layers")
    groups = [[q for q in g if q.requires_grad] for g in model.layer_groups()]
    groups = [g for g in groups if g]
    decay = t.layer_lr_decay or 1.0
    return [{"params": g, "lr_mult": decay ** (len(groups) - 1 - i), "depth": len(groups) - 1 - i}
            for i, g in enumerate(groups)]


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """``params``: parameters, or parameter groups (:func:`parameter_groups`)."""
    t = cfg.train
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [q for q in params if q.requires_grad]
    if t.optimizer in ("sgd", "nt_asgd"):
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    try:   # one fused kernel over all parameters (CPU and CUDA, torch >= 2.4): a few times faster
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kwargs)


class Averager:
    """An average of the trained parameters over the steps since averaging began: their running
    mean (NT-ASGD's averaged iterate), or with ``decay`` an exponential moving average (Polyak
    averaging) whose first steps are the running mean, so it does not start from the random
    initialisation: step n weighs the newest weights by max(1 - decay, 1/n). Evaluation and
    checkpoints' ``model`` use the average; training goes on from the raw weights, which
    checkpoints keep beside it for resuming. ``params``: the trained ones (others, such as
    frozen LMs, are their own average); default every parameter of ``model``."""

    def __init__(self, model: torch.nn.Module, decay: float | None = None,
                 params: list[torch.nn.Parameter] | None = None):
        self.model, self.decay = model, decay
        self.params = list(model.parameters()) if params is None else list(params)
        self.mean = [torch.zeros_like(q) for q in self.params]
        self.count = 0

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        weight = 1.0 / self.count if self.decay is None else max(1.0 - self.decay, 1.0 / self.count)
        torch._foreach_lerp_(self.mean, [q.detach() for q in self.params], weight)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the mean in place of each trained parameter."""
        if self.count == 0:
            return self.model.state_dict()
        by_id = {id(q): m for q, m in zip(self.params, self.mean)}
        return {k: by_id.get(id(v), v).detach() for k, v in self.model.state_dict(keep_vars=True).items()}

    @contextlib.contextmanager
    def swapped_in(self):
        """The mean in the model's parameters for the block, the raw weights back after it."""
        if self.count == 0:
            yield
            return
        with torch.no_grad():
            raw = [q.detach().clone() for q in self.params]
            torch._foreach_copy_(self.params, self.mean)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "raw": self.model.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        """After the model was loaded with a checkpoint's (averaged) weights: those are the
        mean; the raw weights go back into the model."""
        with torch.no_grad():
            torch._foreach_copy_(self.mean, [q.detach() for q in self.params])
        self.count = state["count"]
        self.model.load_state_dict(state["raw"])
