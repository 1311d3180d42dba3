"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"): a
language model that keeps learning while it reads. The text is scored a segment of ``n``
tokens at a time with the state carried; each segment is predicted first, then the model
takes one gradient step on it, so what it read shapes how it predicts what follows.

The rule (``rms``, the paper's RMSprop-like update with a decay towards the trained weights):

    theta <- theta - eta * g / (sqrt(MS) + eps) + lambda * min(sqrt(MS) / mean(sqrt(MS)), 1/lambda) * (theta_0 - theta)

with ``g`` the gradient of the segment's mean loss per token, ``MS`` each parameter's mean
squared gradient over segments of the training text (collected once, kept beside the
checkpoint) and ``mean`` over every parameter of the model; ``sgd`` is
``theta <- theta - eta * g + lambda * (theta_0 - theta)``. The checkpoint is never changed:
the adapted weights live in memory only.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from rnnkit.config import ConfigError
from rnnkit.models.rnn import detach_state
from rnnkit.training.checkpoint import CheckpointError

RULES = ("rms", "sgd")
DEFAULT_LR = {"rms": 0.002, "sgd": 0.1}
STATS_SUFFIX = ".dynamic-stats"
STATS_FORMAT = 3
KEPT_STATS = 4                   # statistics for this many (rows, segment, tokens) kept beside a checkpoint


@dataclass(frozen=True)
class Dynamic:
    """How a model adapts while it reads; the paper's settings by default."""
    rule: str = "rms"
    lr: float | None = None          # None: 0.002 for rms, 0.1 for sgd
    decay: float = 0.02              # lambda: the pull back towards the trained weights
    eps: float = 0.001
    segment: int = 5                 # n: tokens per update
    stats_tokens: int = 500_000      # training tokens the gradient statistics are collected over

    @property
    def rate(self) -> float:
        return DEFAULT_LR[self.rule] if self.lr is None else self.lr

    def check(self) -> "Dynamic":
        if self.rule not in RULES:
            raise ConfigError("", f"--dynamic-rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name, value in (("--dynamic-lr", self.rate), ("--dynamic-decay", self.decay), ("--dynamic-eps", self.eps)):
            if not math.isfinite(value) or value < 0:
                raise ConfigError("", f"{name} must be a finite number >= 0, got {value}")
        if self.segment < 1 or self.stats_tokens < self.segment:
            raise ConfigError("", "--dynamic-segment must be at least 1 and below --dynamic-stats-tokens")
        return self


def _params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _segments(length: int, n: int):
    return range(0, length - 1, n)


def _segment(task: Any, stream: torch.Tensor, start: int, n: int, state: Any):
    """The segment of ``stream`` from ``start``: each position's loss (B, T), the top layer's
    outputs, the targets and the state after it."""
    x = stream[:, start:start + n]
    y = stream[:, start + 1:start + 1 + n]
    x = x[:, :y.size(1)]
    out, top, _, state = task.model.features(x, state)
    return task.model.loss(out, y, reduction="none").view(y.shape), top, y, state


def gradient_stats(task: Any, stream: torch.Tensor, segment: int,
                   progress: Callable = iter) -> dict[str, torch.Tensor]:
    """sqrt(MS): each parameter's root mean squared gradient of the mean loss per token over
    segments of ``stream`` (rows, length), the state carried, the weights unchanged."""
    model = task.model.eval()
    sums = {n: torch.zeros_like(p) for n, p in _params(model)}
    state, count = None, 0
    for start in progress(_segments(stream.size(1), segment)):
        model.zero_grad(set_to_none=True)
        nll, _, _, state = _segment(task, stream, start, segment, state)
        nll.mean().backward()
        state = detach_state(state)
        for n, p in _params(model):
            if p.grad is not None:
                sums[n] += p.grad.detach().square()
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: (s / max(1, count)).sqrt() for n, s in sums.items()}


def checkpoint_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stats_beside(task: Any, checkpoint: Path, settings: Dynamic, training_ids: Callable[[], np.ndarray],
                 rows: int, note: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The gradient statistics of ``checkpoint`` for a text read in ``rows`` streams side by
    side: the mean squared gradient of a segment's mean loss shrinks as more rows share it,
    so the statistics come from the training text laid out in as many rows as the text being
    read (Krause et al. collect them as they evaluate). Read from ``CHECKPOINT.dynamic-stats``
    when it holds statistics from these very bytes with these settings, else computed from
    the training text and added there atomically (the checkpoint itself is never touched)."""
    path = Path(str(checkpoint) + STATS_SUFFIX)
    digest = checkpoint_digest(checkpoint)
    key = {"format": STATS_FORMAT, "checkpoint_sha256": digest, "segment": settings.segment,
           "tokens": settings.stats_tokens, "rows": rows}
    kept: list[dict] = []
    if path.is_file():
        try:
            saved = torch.load(path, map_location=task.device, weights_only=True)
            kept = [e for e in saved["entries"] if e["key"].get("checkpoint_sha256") == digest]
            for entry in kept:
                if entry["key"] == key and set(entry["stats"]) == {n for n, _ in _params(task.model)}:
                    return entry["stats"]
        except Exception:  # noqa: BLE001 - a damaged or foreign file is recomputed
            kept = []
    ids = np.asarray(training_ids(), np.int64)[: settings.stats_tokens + 1]
    if len(ids) < rows * settings.segment + 1:
        raise ConfigError("", "the training text is too short to collect gradient statistics")
    if note is not None:
        note(f"collecting gradient statistics over {len(ids) - 1:,} training tokens in {rows} stream(s) "
             f"(once; kept in {path.name})")
    ids = ids[: rows * ((len(ids) - 1) // rows) + 1]
    stream = torch.from_numpy(np.ascontiguousarray(ids[:-1].reshape(rows, -1))).to(task.device)
    bar = (lambda it: tqdm(it, desc="gradient statistics", unit="segment", file=sys.stderr, leave=False))
    with torch.enable_grad():
        stats = gradient_stats(task, stream, settings.segment, bar)
    entries = [*kept[-(KEPT_STATS - 1):], {"key": key, "stats": {n: s.cpu() for n, s in stats.items()}}]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"entries": entries}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if note is not None:
            note(f"could not keep the gradient statistics beside the checkpoint ({err.strerror}); they are used "
                 f"for this run only")
    return stats


class Adapter:
    """One update per segment by :class:`Dynamic`'s rule, from the weights as loaded."""

    def __init__(self, model: torch.nn.Module, settings: Dynamic, stats: dict[str, torch.Tensor] | None):
        self.settings = settings
        self.params = _params(model)
        self.start = {n: p.detach().clone() for n, p in self.params}
        self.scale: dict[str, torch.Tensor] = {}
        self.pull: dict[str, torch.Tensor] = {}
        self.keep: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.step: dict[str, torch.Tensor] = {}
        self._ready = False
        if settings.rule == "rms":
            if stats is None:
                raise ValueError("the rms rule needs gradient statistics")
            total = sum(float(s.sum()) for s in stats.values())
            mean = total / max(1, sum(s.numel() for s in stats.values()))
            for n, _ in self.params:
                rms = stats[n].to(self.start[n].device)
                self.scale[n] = 1.0 / (rms + settings.eps)
                ratio = rms / mean if mean > 0 else torch.ones_like(rms)
                self.pull[n] = settings.decay * ratio.clamp(max=1.0 / settings.decay if settings.decay else math.inf)

    @torch.no_grad()
    def update(self) -> None:
        """theta <- theta * (1 - pull) + pull * theta_0 - eta * scale * g, the rule's three terms
        in two in-place passes over each parameter (``keep``, ``anchor``, ``step`` made once)."""
        if not self._ready:
            self._prepare()
        for n, p in self.params:
            if p.grad is None:
                continue
            if n in self.keep:
                p.mul_(self.keep[n]).add_(self.anchor[n])
            p.addcmul_(p.grad, self.step[n], value=-1.0) if n in self.step else p.add_(p.grad, alpha=-self.settings.rate)

    def _prepare(self) -> None:
        s = self.settings
        for n, _ in self.params:
            pull = self.pull[n] if s.rule == "rms" else torch.full_like(self.start[n], s.decay)
            if s.decay:
                self.keep[n], self.anchor[n] = 1.0 - pull, pull * self.start[n]
            if s.rule == "rms":
                self.step[n] = s.rate * self.scale[n]
        self.scale, self.pull = {}, {}
        self._ready = True

    @torch.no_grad()
    def reset(self) -> None:
        for n, p in self.params:
            p.copy_(self.start[n])


def dynamic_loss(task: Any, stream: torch.Tensor, adapter: Adapter, segment: int,
                 progress: Callable = iter, keep_states: bool = False) -> tuple:
    """Mean loss per token of ``stream`` (rows, length), each segment predicted before the
    model adapts to it; returns (mean loss, tokens, updates skipped for a non-finite loss),
    and with ``keep_states`` also (top-layer states (B, N, H), p(next word) (B, N), next
    words (B, N)) for the continuous cache."""
    model = task.model.eval()
    total, count, skipped, state = 0.0, 0, 0, None
    hidden, p_model, words = [], [], []
    for start in progress(_segments(stream.size(1), segment)):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            nll, top, y, state = _segment(task, stream, start, segment, state)
            loss, tokens = nll.sum(), y.numel()
            value = float(loss.detach())
            if math.isfinite(value):
                (loss / tokens).backward()
        state = detach_state(state)
        if keep_states:
            hidden.append(top.detach().float().cpu().numpy())
            p_model.append(np.exp(-nll.detach().double().cpu().numpy()))
            words.append(y.cpu().numpy())
        total += value
        count += tokens
        if math.isfinite(value):
            adapter.update()
        else:
            skipped += 1
    model.zero_grad(set_to_none=True)
    result = (total / max(1, count), count, skipped)
    if keep_states:
        return (*result, (np.concatenate(hidden, 1), np.concatenate(p_model, 1), np.concatenate(words, 1)))
    return result


def check_checkpoint(path: Any) -> Path:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: an export has no gradients; --dynamic needs the checkpoint")
    return p
