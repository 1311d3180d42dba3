"""Online forecasting: a trained forecaster that forecasts at each arriving time step and
then learns from what has arrived (FSNet, Pham et al. 2023; OneNet, Zhang et al. 2023).

Two protocols:

- ``leak-free`` (the default): a window's loss is taken once all its ``horizon`` target rows
  have arrived, so at time t (rows before t known) the model learns from the window whose
  targets end at row t - 1, never from a value before its arrival.
- ``published``: FSNet's protocol, as its tables were measured: right after forecasting the
  window that starts at t, the model learns from that window's whole target, rows t to
  t + horizon - 1, most of which have not arrived yet (the leak DSOF, ICLR 2025, pointed
  out). Use it to compare with the published figures, not to deploy.

:class:`OnlineLearner` holds the model being adapted, its optimizer and an optional replay
buffer of past windows, and knows only the rows it was given (``arrive``); :func:`replay`
runs a series through it as a stream, pulling rows from an iterator one at a time (the
published protocol pulls ``horizon`` rows ahead, which is its leak).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rnnkit.config import ConfigError

PROTOCOLS = ("leak-free", "published")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Online:
    protocol: str = "leak-free"
    optimizer: str = "sgd"
    lr: float = 0.001
    updates: int = 1                 # optimizer steps per arrival
    replay: int = 0                  # past windows kept for replay (0: none)
    replay_batch: int = 8            # of them, drawn into each update beside the new window
    seed: int = 0

    def check(self) -> "Online":
        if self.protocol not in PROTOCOLS:
            raise ConfigError("", f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("", f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not math.isfinite(self.lr) or self.lr < 0:
            raise ConfigError("", f"--lr must be a finite number >= 0, got {self.lr}")
        if self.updates < 0 or self.replay < 0 or self.replay_batch < 0:
            raise ConfigError("", "--updates, --replay and --replay-batch must be >= 0")
        return self


class OnlineLearner:
    """A forecaster learning from a stream of standardised rows (C columns each). ``forecast``
    gives the standardised forecast (H, T) from the last ``input_length`` rows; ``arrive``
    adds a row and, in the leak-free protocol, learns from the window just completed;
    ``learn`` takes one update on a window (the published protocol calls it with targets
    that have not arrived)."""

    def __init__(self, task: Any, settings: Online, history: np.ndarray):
        self.task, self.settings = task, settings.check()
        d = task.cfg.data
        self.length, self.horizon = d.input_length, d.horizon
        self.rows: deque = deque((np.asarray(r, np.float32) for r in history[-(self.length + self.horizon):]),
                                 maxlen=self.length + self.horizon)
        params = [p for p in task.model.parameters() if p.requires_grad]
        make = torch.optim.SGD if settings.optimizer == "sgd" else torch.optim.Adam
        self.optimizer = make(params, lr=settings.lr)
        self.buffer: deque = deque(maxlen=max(1, settings.replay))
        self.rng = np.random.default_rng(settings.seed)
        self.updates = self.skipped = 0
        self.loss_fn = F.mse_loss if task.cfg.model.loss == "mse" else F.l1_loss

    def forecast(self) -> np.ndarray:
        if len(self.rows) < self.length:
            raise ValueError(f"{self.length} rows are needed before the first forecast; {len(self.rows)} arrived")
        x = np.stack(list(self.rows)[-self.length:])[None]
        return self.task.predict_windows(x)[0]

    def arrive(self, row: np.ndarray) -> None:
        self.rows.append(np.asarray(row, np.float32))
        if self.settings.protocol == "leak-free" and len(self.rows) == self.length + self.horizon:
            rows = np.stack(list(self.rows))
            self.learn(rows[:self.length], rows[self.length:][:, self.task.targets])

    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """One update (``updates`` optimizer steps) on the window ``x`` (L, C) -> ``y`` (H, T),
        with replayed windows; a non-finite loss skips it and is counted."""
        if not self.settings.updates or not self.settings.lr:
            return
        xs, ys = [x], [y]
        if self.settings.replay and self.buffer and self.settings.replay_batch:
            picks = self.rng.choice(len(self.buffer), min(self.settings.replay_batch, len(self.buffer)), replace=False)
            xs += [self.buffer[i][0] for i in picks]
            ys += [self.buffer[i][1] for i in picks]
        if self.settings.replay:
            self.buffer.append((x, y))
        dev = self.task.device
        bx = torch.from_numpy(np.stack(xs).astype(np.float32)).to(dev)
        by = torch.from_numpy(np.stack(ys).astype(np.float32)).to(dev)
        model = self.task.model
        model.eval()                            # no dropout: one window at a time
        for _ in range(self.settings.updates):
            with torch.enable_grad():
                loss = self.loss_fn(model(bx).float(), by)
                if not torch.isfinite(loss):
                    self.skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    return
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            self.updates += 1


def replay(task: Any, rows: Iterator[np.ndarray], start: int, count: int, settings: Online,
           progress: Callable = iter) -> tuple[np.ndarray, OnlineLearner]:
    """Stream ``rows`` (standardised, in order) through an :class:`OnlineLearner`: rows before
    ``start`` are history; then for each of ``count`` origins t = start, start + 1, ...: the
    forecast of rows t .. t + H - 1 is made, the published protocol learns from that window
    (pulling its H target rows ahead), and row t arrives. Returns the forecasts (count, H, T)."""
    history = [next(rows) for _ in range(start)]
    learner = OnlineLearner(task, settings, np.asarray(history, np.float32))
    ahead: deque = deque()

    def pull() -> np.ndarray:
        return ahead.popleft() if ahead else next(rows)

    horizon, out = learner.horizon, []
    for _ in progress(range(count)):
        prediction = learner.forecast()
        out.append(prediction)
        if settings.protocol == "published":
            while len(ahead) < horizon:
                ahead.append(next(rows))
            x = np.stack(list(learner.rows)[-learner.length:])
            learner.learn(x, np.stack(list(ahead))[:, task.targets])
        learner.arrive(pull())
    return np.asarray(out), learner
