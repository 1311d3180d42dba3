"""Where a run is (saved in every checkpoint) and the log window behind each record of metrics.jsonl."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rnnkit.hardware import peak_rss_mb
from rnnkit.training import distributed
from rnnkit.training.interface import StepResult


def format_number(v: float) -> str:
    """Four decimals, or four significant digits for values too small to show that way."""
    return f"{v:.4f}" if not math.isfinite(v) or v == 0 or abs(v) >= 0.01 else f"{v:.4g}"


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0           # next batch of ``epoch`` to train on
    elapsed: float = 0.0           # training seconds over all sessions of this run
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    nonfinite: int = 0             # updates skipped for a non-finite loss or gradient, in all
    nonfinite_run: int = 0         # ... in a row, up to now
    window_loss: float = 0.0       # the log window's running sums, so a resumed run logs the
    window_tokens: int = 0         # very records an uninterrupted one does
    eval_due: bool = False         # stopped by a signal at a step that was to be evaluated
    history: list[float] = field(default_factory=list)   # every evaluation's metric (nt_asgd's trigger)
    averaging_from: int | None = None   # nt_asgd: the step weight averaging began at


class LogWindow:
    """Loss and tokens since the last log record, summed on the device (no sync per step)."""

    def __init__(self, device: torch.device, loss: float = 0.0, tokens: int = 0):
        self.loss = torch.tensor(loss, device=device)
        self.tokens, self.start = tokens, time.perf_counter()

    def add(self, out: StepResult) -> None:
        self.loss += out.loss.detach().float() * out.tokens
        self.tokens += out.tokens

    def totals(self, rank: distributed.Rank = distributed.SINGLE) -> tuple[float, int]:
        """The summed loss and tokens of the window, over every rank (a collective when several)."""
        loss, tokens = self.loss.item(), self.tokens
        if rank.world > 1:
            loss, tokens = distributed.all_sum([loss, float(tokens)], self.loss.device)
        return loss, int(tokens)

    def flush(self, step: int, elapsed: float, lr: float, norm, logs,
              rank: distributed.Rank = distributed.SINGLE) -> dict[str, Any]:
        """The record of the window (every rank's tokens together); resets the sums."""
        now = time.perf_counter()
        loss, tokens = self.totals(rank)
        record = {"kind": "train", "step": step, "elapsed": round(elapsed, 4),
                  "loss": loss / max(1, tokens), "lr": lr, "tokens": tokens,
                  "tokens_per_s": tokens / max(1e-9, now - self.start)}
        if norm is not None:
            record["grad_norm"] = float(norm)
        peak = peak_rss_mb()
        if peak is not None:
            record["peak_rss_mb"] = peak
        record.update(logs or {})
        self.loss.zero_()
        self.tokens, self.start = 0, now
        return record
