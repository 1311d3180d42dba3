"""The adding problem (Hochreiter and Schmidhuber 1997; Le et al. 2015): remember two marked
numbers across a long sequence and report their sum.

Each of T steps shows a number drawn uniformly from [0, 1) and a marker, 1 at exactly two
steps (one in the first half, one in the second) and 0 elsewhere. After the last step the
model predicts the sum of the two marked numbers. Always answering 1.0 scores a mean
squared error of 1/6 (the variance of the sum of two uniform numbers): the baseline.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import Config
from rnnkit.config.memory import AddingDataConfig as DataConfig  # noqa: F401  (this task's sections)
from rnnkit.config.memory import ModelConfig  # noqa: F401
from rnnkit.tasks.memory import MemoryTask, SequenceModel

BASELINE_MSE = 1.0 / 6.0



def generate_adding(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences: inputs (n, T, 2) [number, marker] and targets (n,), the marked sum."""
    values = torch.rand(n, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], -1), values[rows, first] + values[rows, second]


class AddingTask(MemoryTask):
    def make_model(self) -> SequenceModel:
        return SequenceModel(nn.Identity(), 2, self.cfg.model, 1)

    @property
    def loss_start(self) -> int:
        return self.cfg.data.length - 1

    def generate(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return generate_adding(n, self.cfg.data.length, generator)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model(x)[:, -1]).squeeze(-1)

    def loss_and_stats(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        pred = self.predict(x).float()
        loss = F.mse_loss(pred, y)
        with torch.no_grad():
            stats = {"se": loss * y.numel(), "ae": (pred - y).abs().sum(), "baseline_se": (y - 1.0).pow(2).sum()}
        return loss, stats

    def metrics(self, totals: dict[str, float], n: int) -> dict[str, float]:
        mse = totals["se"] / n
        return {"loss": mse, "mse": mse, "mae": totals["ae"] / n, "baseline_mse": totals["baseline_se"] / n}


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> AddingTask:
    return AddingTask(cfg, device)
