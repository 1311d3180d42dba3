"""Teacher-forcing ratio schedules (scheduled sampling, Bengio et al. 2015)."""
from __future__ import annotations

import math

from rnnkit.config import TeacherForcingConfig


class TeacherForcingSchedule:
    """Ratio at a training step, going from ``start`` towards ``end`` over ``steps``:

    - constant:        start
    - linear:          start + (end - start) * min(1, step / steps)
    - exponential:     end + (start - end) * 0.01 ** (step / steps)   (1% of the gap left at ``steps``)
    - inverse_sigmoid: end + (start - end) / (1 + exp(10 * (step / steps - 0.5)))   (halfway at steps / 2)
    """

    def __init__(self, cfg: TeacherForcingConfig):
        self.cfg = cfg

    def __call__(self, step: int) -> float:
        c = self.cfg
        x = step / c.steps
        if c.schedule == "constant":
            return c.start
        if c.schedule == "linear":
            return c.start + (c.end - c.start) * min(1.0, x)
        if c.schedule == "exponential":
            return c.end + (c.start - c.end) * 0.01 ** x
        z = min(50.0, 10.0 * (x - 0.5))
        return c.end + (c.start - c.end) / (1.0 + math.exp(z))
