"""Language-model inference written once for every backend: sampling, scoring a stream, and
feeding text a piece at a time.

A backend is anything with ``step(ids, state) -> (log_probs, state)``: ``ids`` an int64 array
(B, T), ``log_probs`` a float array (B, T, V) of each position's next-token distribution,
``state`` whatever the backend carries between calls (None to start). The torch task and the
onnxruntime runtime each implement ``step``; nothing here imports torch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np


class StepModel(Protocol):
    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


class StatesModel(StepModel, Protocol):
    def step_states(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """As ``step``, with the top layer's output at every position (B, T, H) in the middle.
        A backend may also offer ``target_states(ids, targets, state)``, which returns the
        targets' log-probabilities (B, T) in place of the whole distribution."""


def filter_log_probs(scores: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """``scores`` (V,) with everything outside the top-k / the smallest top-p nucleus at -inf."""
    scores = scores.astype(np.float64, copy=True)
    if top_k is not None and 0 < top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores[scores < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        probs = _softmax(scores[order])
        before = np.cumsum(probs) - probs
        scores[order[before >= top_p]] = -np.inf     # keep the first token that crosses top_p
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    out = np.zeros_like(x, dtype=np.float64)
    if finite.any():
        e = np.exp(x[finite] - x[finite].max())
        out[finite] = e / e.sum()
    return out


def sample_next(log_probs: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
                rng: np.random.Generator) -> int:
    """One token id drawn from ``log_probs`` (V,) at ``temperature`` after top-k / top-p."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    probs = _softmax(filter_log_probs(log_probs / temperature, top_k, top_p))
    return int(rng.choice(probs.size, p=probs))


def generate(model: StepModel, prime: Sequence[int], length: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             banned: Sequence[int] = ()) -> Iterator[int]:
    """``length`` token ids sampled after feeding ``prime`` (never one of ``banned``). The same
    seed gives the same ids on the same backend."""
    rng = np.random.default_rng(seed)
    log_probs, state = model.step(np.asarray([list(prime)], dtype=np.int64), None)
    last = log_probs[0, -1].astype(np.float64)
    for _ in range(length):
        last[list(banned)] = -np.inf
        token = sample_next(last, temperature, top_k, top_p, rng)
        yield token
        log_probs, state = model.step(np.asarray([[token]], dtype=np.int64), state)
        last = log_probs[0, -1].astype(np.float64)


def stream_nll(model: StepModel, stream: np.ndarray, window: int,
               progress: Callable[[Iterator[int]], Iterator[int]] = iter) -> tuple[float, int]:
    """Summed negative log-likelihood and token count of a (rows, length) id stream, scored in
    windows of ``window`` positions with the state carried across them."""
    total, count, state = 0.0, 0, None
    for start in progress(range(0, stream.shape[1] - 1, window)):
        x = stream[:, start:start + window]
        y = stream[:, start + 1:start + 1 + window]
        x = x[:, :y.shape[1]]
        log_probs, state = model.step(np.ascontiguousarray(x, dtype=np.int64), state)
        total -= float(np.take_along_axis(log_probs, y[..., None].astype(np.int64), -1).astype(np.float64).sum())
        count += y.size
    return total, count


def stream_states(model: StatesModel, stream: np.ndarray, window: int,
                  progress: Callable[[Iterator[int]], Iterator[int]] = iter
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a (rows, length) id stream: every position's top-layer state (B, N, H),
    the model's probability of its next word (B, N), and that word (B, N)."""
    hidden, p_model, words, state = [], [], [], None
    for start in progress(range(0, stream.shape[1] - 1, window)):
        y = stream[:, start + 1:start + 1 + window].astype(np.int64)
        x = np.ascontiguousarray(stream[:, start:start + y.shape[1]], dtype=np.int64)
        if hasattr(model, "target_states"):     # a backend that scores the targets alone (adaptive softmax)
            target, top, state = model.target_states(x, y, state)
        else:
            log_probs, top, state = model.step_states(x, state)
            target = np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
        p_model.append(np.exp(target.astype(np.float64)))
        hidden.append(top.astype(np.float32))
        words.append(y)
    return np.concatenate(hidden, 1), np.concatenate(p_model, 1), np.concatenate(words, 1)


def cache_probs(hidden: np.ndarray, words: np.ndarray, size: int, theta: float,
                chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Grave et al.'s continuous cache over :func:`stream_states`: at each position t, the next
    words of the last ``size`` positions i < t, weighted by ``softmax(theta * h_t . h_i)`` of
    their states against the current one; returns the cache's probability of the actual next
    word (B, N) and whether the cache had anything yet (B, N). Each stream (row) has its own
    cache."""
    rows, n = words.shape
    p_cache, seen = [], []
    for lo in range(0, n, chunk):
        hi, first = min(n, lo + chunk), max(0, lo - size)
        scores = theta * np.matmul(hidden[:, lo:hi], hidden[:, first:hi].transpose(0, 2, 1)).astype(np.float64)
        at = np.arange(first, hi)
        now = np.arange(lo, hi)[:, None]
        allowed = (at < now) & (at >= now - size)                       # (chunk, history)
        scores = np.where(allowed, scores, -np.inf)
        top = scores.max(-1, keepdims=True)
        has = np.isfinite(top)
        weights = np.where(has, np.exp(scores - np.where(has, top, 0.0)), 0.0)
        weights /= np.where(has, weights.sum(-1, keepdims=True), 1.0)    # no history yet: no cache
        same = words[:, first:hi][:, None, :] == words[:, lo:hi][:, :, None]
        p_cache.append((weights * same).sum(-1))
        seen.append(np.broadcast_to(allowed.any(-1), (rows, hi - lo)))
    return np.concatenate(p_cache, 1), np.concatenate(seen, 1)


def cache_mix_loss(p_model: np.ndarray, p_cache: np.ndarray, seen: np.ndarray, lam: float) -> float:
    """Mean negative log-likelihood of the mixture of model and cache (weight ``lam``)."""
    mixed = np.where(seen, (1 - lam) * p_model + lam * p_cache, p_model)
    return float(-np.log(mixed).mean())


class Incremental:
    """Text fed a piece at a time, the state kept between pieces: each token costs one step.

    :meth:`feed` returns the next-token distribution after everything fed so far; ``log_probs``
    holds the log-probability of every fed token after the first, given the tokens before it,
    the same values as scoring the whole text at once.
    """

    def __init__(self, model: StepModel, encode: Callable[[str], list[int]], vocab: Sequence[str]):
        self.model, self.encode, self.vocab = model, encode, list(vocab)
        self.state: Any = None
        self.log_probs: list[float] = []
        self.tokens: list[int] = []
        self._next: np.ndarray | None = None     # the distribution of the token to come (log)

    def feed(self, text: str) -> np.ndarray:
        """Feed ``text`` (its tokens continue the earlier pieces'); the next token's probabilities (V,)."""
        ids = self.encode(text)
        if not ids:
            if self._next is None:
                raise ValueError("nothing fed yet: the first piece must hold at least one token")
            return np.exp(self._next)
        log_probs, self.state = self.model.step(np.asarray([ids], dtype=np.int64), self.state)
        scores = log_probs[0].astype(np.float64)
        if self._next is not None:
            self.log_probs.append(float(self._next[ids[0]]))
        self.log_probs.extend(float(scores[i, t]) for i, t in enumerate(ids[1:]))
        self.tokens.extend(ids)
        self._next = scores[-1]
        return np.exp(self._next)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest next tokens and their probabilities."""
        if self._next is None:
            return []
        order = np.argsort(-self._next)[:k]
        return [(self.vocab[i], float(np.exp(self._next[i]))) for i in order]
