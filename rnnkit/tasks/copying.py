"""The copy task (Hochreiter and Schmidhuber 1997; Arjovsky et al. 2016): reproduce K symbols
after a long blank delay.

An input sequence is K symbols drawn uniformly from an alphabet of A, then T blanks, then
a recall marker, then K - 1 more blanks; from the marker on, the model must output the K
symbols in order. The loss and accuracy are measured on those K outputs only. Guessing
uniformly scores a loss of log(A) nats and an accuracy of 1/A: the baseline.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import Config
from rnnkit.config.memory import CopyDataConfig as DataConfig  # noqa: F401  (this task's sections)
from rnnkit.config.memory import CopyModelConfig as ModelConfig  # noqa: F401
from rnnkit.tasks.memory import MemoryTask, SequenceModel

BLANK = 0


def generate_copy(n: int, symbols: int, delay: int, alphabet: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 2K + T): symbols 1..A, blank 0, marker A + 1; targets (n, K) in 0..A-1."""
    targets = torch.randint(0, alphabet, (n, symbols), generator=generator)
    x = torch.full((n, 2 * symbols + delay), BLANK, dtype=torch.long)
    x[:, :symbols] = targets + 1
    x[:, symbols + delay] = alphabet + 1
    return x, targets


class CopyTask(MemoryTask):
    def make_model(self) -> SequenceModel:
        m, d = self.cfg.model, self.cfg.data
        return SequenceModel(nn.Embedding(d.alphabet + 2, m.embedding_dim), m.embedding_dim, m, d.alphabet)

    @property
    def loss_start(self) -> int:
        return self.cfg.data.symbols + self.cfg.data.length   # the recall marker

    def generate(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        return generate_copy(n, d.symbols, d.length, d.alphabet, generator)

    def loss_and_stats(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.model.head(self.model(x)[:, self.loss_start:]).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        with torch.no_grad():
            stats = {"nll": loss * y.numel(), "correct": (logits.argmax(-1) == y).sum(), "symbols": y.numel()}
        return loss, stats

    def metrics(self, totals: dict[str, float], n: int) -> dict[str, float]:
        a = self.cfg.data.alphabet
        return {"loss": totals["nll"] / totals["symbols"], "accuracy": totals["correct"] / totals["symbols"],
                "baseline_loss": math.log(a), "baseline_accuracy": 1.0 / a}


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> CopyTask:
    return CopyTask(cfg, device)
