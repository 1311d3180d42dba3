"""What the long-memory tasks (``adding``, ``copy``) share: data generated from the run's
seed, a recurrent network over it, metrics beside the baseline, gradient flow.

Training batches are fresh, each drawn from its own generator seeded by the run's seed,
the epoch and the batch's index, so a resumed run sees the very batches an uninterrupted
one would. The validation and test sets are fixed by the seed alone.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnkit.config import (Config, recurrent_options)
from rnnkit.config.memory import ModelConfig
from rnnkit.gradient_flow import GradientFlow, measure
from rnnkit.models.rnn import make_rnn
from rnnkit.training import distributed
from rnnkit.training.interface import StepResult

SPLITS = {"valid": 1, "test": 2}


class SequenceModel(nn.Module):
    """Input layer -> stacked recurrent layer -> output head (applied by the task where it scores)."""

    def __init__(self, inputs: nn.Module, input_size: int, m: ModelConfig, outputs: int):
        super().__init__()
        self.inputs = inputs
        self.rnn = make_rnn(m.cell, input_size, m.hidden_size, m.num_layers, m.dropout, **recurrent_options(m))
        self.head = nn.Linear(m.hidden_size, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) inputs -> the top layer's outputs (B, T, H)."""
        return self.rnn(self.inputs(x))[0]


class MemoryTask:
    """Subclasses define ``make_model``, ``generate(n, generator)``, ``loss_and_stats`` and ``metrics``."""

    loss_start: int   # the first time step the loss reads (gradient flow is measured back from it)

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = self.make_model().to(device)
        self._sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def generator(self, *keys: int) -> torch.Generator:
        seed = self.cfg.seed
        for k in keys:
            seed = (seed * 1_000_003 + k + 1) % (2 ** 62)
        return torch.Generator().manual_seed(seed)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed validation or test set (generated once, from the seed)."""
        if name not in self._sets:
            size = self.cfg.data.valid_size if name == "valid" else self.cfg.data.test_size
            x, y = self.generate(size, self.generator(SPLITS[name]))
            self._sets[name] = (x.to(self.device), y.to(self.device))
        return self._sets[name]

    # ------------------------------------------------------------------ training interface
    def train_batches(self, epoch: int) -> list[tuple[int, int]]:
        return [(epoch, i) for i in range(self.cfg.data.epoch_batches)]

    def shard(self, batch: tuple[int, int], rank: distributed.Rank) -> tuple[int, int, int, int] | list:
        """Under torchrun each rank generates the whole batch and keeps its rows."""
        lo, hi = distributed.share(self.cfg.train.batch_size, rank)
        return (*batch, lo, hi) if hi > lo else []

    def train_step(self, batch: tuple[int, ...], index: int, step: int) -> StepResult:
        epoch, i, lo, hi = batch if len(batch) == 4 else (*batch, 0, self.cfg.train.batch_size)
        x, y = self.generate(self.cfg.train.batch_size, self.generator(0, epoch, i))
        x, y = x[lo:hi], y[lo:hi]
        loss, _ = self.loss_and_stats(x.to(self.device), y.to(self.device))
        return StepResult(loss, y.size(0))

    def train_state(self) -> dict[str, Any]:
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        pass

    def extras(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def evaluate_split(self, name: str = "valid") -> dict[str, float]:
        """Metrics over a whole fixed set, with the baseline's beside them."""
        was_training = self.model.training
        self.model.eval()
        x, y = self.split(name)
        bs = self.cfg.train.eval_batch_size
        totals: dict[str, float] = {}
        for i in range(0, x.size(0), bs):
            _, stats = self.loss_and_stats(x[i:i + bs], y[i:i + bs])
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        self.model.train(was_training)
        return self.metrics(totals, x.size(0))

    def evaluate(self) -> dict[str, float]:
        return self.evaluate_split("valid")

    def gradient_flow(self) -> GradientFlow:
        """dL/dh_t on a validation batch, back from the first step the loss reads."""
        x, y = self.split("valid")
        bs = self.cfg.train.eval_batch_size
        return measure(self.model, "rnn", lambda: self.loss_and_stats(x[:bs], y[:bs])[0], self.loss_start)
