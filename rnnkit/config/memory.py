"""The configs of the memory lab's synthetic tasks: ``adding`` and ``copy``."""
from __future__ import annotations

from dataclasses import dataclass

from rnnkit.config.core import MAX_DIM, MAX_LAYERS, Config, RecurrentConfig, check_metric, check_recurrent, num

ADDING_METRICS = ("valid_loss", "valid_mse", "valid_mae")
COPY_METRICS = ("valid_loss", "valid_accuracy")


@dataclass
class ModelConfig(RecurrentConfig):
    """A recurrent stack and a linear head."""

    hidden_size: int = num(128, 1, MAX_DIM)
    """Units per recurrent layer."""
    num_layers: int = num(1, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.0, 0, 1, hi_open=True)
    """Between stacked layers."""


@dataclass
class SyntheticData:
    """How many sequences each split draws."""

    valid_size: int = num(1000, 1)
    """Sequences in the fixed validation set."""
    test_size: int = num(1000, 1)
    """Sequences in the test set (`rnnkit eval`)."""
    epoch_batches: int = num(1000, 1)
    """Fresh training batches per epoch."""


@dataclass
class AddingDataConfig(SyntheticData):
    """The adding problem: two marked numbers among T, their sum to predict."""

    length: int = num(100, 2)
    """T: time steps per sequence."""


@dataclass
class CopyDataConfig(SyntheticData):
    """The copy task: K symbols to reproduce after T blank steps."""

    length: int = num(100, 1)
    """T: blank steps between the symbols and the recall marker."""
    symbols: int = num(10, 1)
    """K: symbols to remember."""
    alphabet: int = num(8, 2)
    """A: distinct symbols."""


@dataclass
class CopyModelConfig(ModelConfig):
    """A symbol embedding, a recurrent stack and a linear head."""

    embedding_dim: int = num(16, 1, MAX_DIM)
    """Width of the symbol vectors."""


def check_adding(cfg: Config) -> None:
    check_recurrent(cfg.model, "model")
    check_metric(cfg, ADDING_METRICS)


def check_copy(cfg: Config) -> None:
    check_recurrent(cfg.model, "model")
    check_metric(cfg, COPY_METRICS)
