"""What the Trainer asks of a task, what a step returns, and where training runs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Sequence

from rnnkit.config import ConfigError

if TYPE_CHECKING:       # torch is imported where a device is resolved: the CLI's error handling
    import torch        # reads TrainingError in processes that run exports without torch


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); shown as one line, exit code 1."""


class StepResult(NamedTuple):
    loss: torch.Tensor           # mean loss over the step's tokens, with a graph
    tokens: int                  # how many tokens the loss covers (for throughput)
    logs: dict[str, float] | None = None  # extra values worth logging (e.g. teacher forcing)
    penalty: torch.Tensor | None = None   # regularisation terms minimised with the loss, not logged as it
    lr_scale: float = 1.0        # this step's learning rate relative to the schedule's (e.g. a shorter window)


class Task(Protocol):
    """What the Trainer needs from a task; it knows nothing else about it."""

    model: torch.nn.Module

    def train_batches(self, epoch: int) -> Sequence[Any]: ...
    def train_step(self, batch: Any, index: int, step: int) -> StepResult: ...
    def evaluate(self) -> dict[str, float]: ...
    def extras(self) -> dict[str, Any]: ...
    def train_state(self) -> dict[str, Any]: ...
    def load_train_state(self, state: dict[str, Any]) -> None: ...
    # optional: def gradient_flow(self) -> rnnkit.gradient_flow.GradientFlow (train.gradient_flow_every)


def resolve_device(spec: str, key: str = "train.device") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for a missing device is a ConfigError."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(key, f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(key, f"{spec!r} asks for a CUDA device, but this machine has "
                               f"{torch.cuda.device_count()}; use 'auto' or 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, "'mps' is not available on this machine; use 'auto' or 'cpu'")
    return dev
