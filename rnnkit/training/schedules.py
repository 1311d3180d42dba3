"""Learning-rate schedules as pure functions of the step (plus the plateau's own state)."""
from __future__ import annotations

import math

from rnnkit.config import TrainConfig


class LRSchedule:
    """Linear warmup, then constant / step / cosine decay; ``plateau`` decays on evaluations;
    ``slanted_triangular`` (Howard and Ruder): from lr/32 up to lr over ``warmup_steps`` (default:
    the first 10% of ``max_steps``), then linearly down to lr/32 at ``max_steps``.

    The rate at a step depends only on the step, the plateau scale and (``decay_by: budget``)
    the training seconds so far, which a checkpoint's progress keeps: resuming needs no more
    state than :meth:`state_dict` returns.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.scale = 1.0       # plateau multiplier
        self.best: float | None = None
        self.bad = 0

    def _decayed(self, step: int, start: int, elapsed: float) -> float:
        """The fraction of the decay done: by steps after ``start``, or under ``decay_by: budget``
        by whichever of steps and training seconds is further along."""
        c = self.cfg
        done = max(0, step - start) / max(1, c.max_steps - start)
        if c.decay_by == "budget" and c.max_time:
            done = max(done, elapsed / c.max_time)
        return min(1.0, done)

    def lr(self, step: int, elapsed: float = 0.0) -> float:
        """The rate for ``step``; ``elapsed`` (training seconds so far) counts only under
        ``decay_by: budget``."""
        c = self.cfg
        if c.lr_schedule == "slanted_triangular":
            cut = c.warmup_steps or max(1, c.max_steps // 10)
            rise = (step + 1) / cut if step < cut else 1 - self._decayed(step + 1, cut, elapsed)
            return c.lr * (1 + 31 * rise) / 32
        warm = (step + 1) / c.warmup_steps if step < c.warmup_steps else 1.0
        if c.lr_schedule == "step":
            rate = c.lr * c.lr_gamma ** (step // c.lr_step_size)
        elif c.lr_schedule == "cosine":
            progress = self._decayed(step, c.warmup_steps, elapsed)
            rate = c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            rate = c.lr * self.scale
        return max(c.min_lr, rate * warm) if c.lr_schedule != "cosine" else rate * warm

    def observe(self, value: float, mode: str) -> None:
        """Feed an evaluation result; only the plateau schedule reacts."""
        if self.cfg.lr_schedule != "plateau":
            return
        better = self.best is None or (value < self.best if mode == "min" else value > self.best)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad > self.cfg.lr_patience:
                self.scale *= self.cfg.lr_gamma
                self.bad = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad = state["scale"], state["best"], state["bad"]
