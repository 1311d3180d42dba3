"""Greedy and batched beam search over any step function.

A decoder here is anything with ``step(tokens (N,), state) -> (logits (N, V), state,
attention (N, S) or None)`` whose state has ``select(index)`` to reorder or expand rows.
Beam search keeps the whole batch times beam on the device as fixed-shape tensors: no
Python loop over sentences or hypotheses, only over time steps.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any, torch.Tensor | None]]


class Hypothesis(NamedTuple):
    tokens: list[int]                 # without <s> and </s>
    score: float                      # log-probability (length-normalised for beam search)
    attention: torch.Tensor | None    # (len(tokens) + 1, S) weights, the </s> step included


def _limits(src_lengths: torch.Tensor, ratio: float, extra: int, cap: int) -> torch.Tensor:
    return (src_lengths.float() * ratio + extra).long().clamp(min=1, max=cap)


def length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's ((5 + |Y|) / 6) ** alpha; alpha 0 ranks by raw log-probability."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def greedy_search(step: StepFn, state: Any, batch_size: int, bos: int, eos: int, src_lengths: torch.Tensor,
                  device: torch.device, max_len_ratio: float = 2.0, max_len_extra: int = 10,
                  max_len_cap: int = 512) -> list[Hypothesis]:
    limits = _limits(src_lengths, max_len_ratio, max_len_extra, max_len_cap).to(device)
    tokens = torch.full((batch_size,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    score = torch.zeros(batch_size, device=device)
    out, attn = [], []
    for t in range(int(limits.max())):
        logits, state, weights = step(tokens, state)
        logp = torch.log_softmax(logits.float(), -1)
        force_end = (t + 1 >= limits) & ~finished
        logp[force_end] = float("-inf")
        logp[force_end, eos] = 0.0
        best, tokens = logp.max(-1)
        score = score + torch.where(finished, torch.zeros_like(best), best)
        tokens = tokens.masked_fill(finished, 0)
        out.append(tokens)
        attn.append(weights)
        finished = finished | (tokens == eos)
        if bool(finished.all()):
            break
    return _collect(torch.stack(out, 1), score, attn, eos)


def _hypothesis(seq: list[int], score: float, weights: torch.Tensor | None, eos: int) -> Hypothesis:
    """Cut a decoded row at its first </s> (padding follows it); keep attention up to and with </s>."""
    n = seq.index(eos) if eos in seq else len(seq)
    return Hypothesis(seq[:n], score, None if weights is None else weights[: n + 1])


def _collect(seqs: torch.Tensor, scores: torch.Tensor, attn: list, eos: int) -> list[Hypothesis]:
    weights = torch.stack(attn, 1).cpu() if attn and attn[0] is not None else None
    return [_hypothesis(seq, score, None if weights is None else weights[i], eos)
            for i, (seq, score) in enumerate(zip(seqs.tolist(), scores.tolist()))]


@torch.no_grad()
def beam_search(step: StepFn, state: Any, batch_size: int, bos: int, eos: int, src_lengths: torch.Tensor,
                device: torch.device, beam: int = 5, n_best: int = 1, alpha: float = 0.0,
                max_len_ratio: float = 2.0, max_len_extra: int = 10,
                max_len_cap: int = 512) -> list[list[Hypothesis]]:
    """The ``n_best`` hypotheses per sentence, best first.

    A sentence is done once its ``n_best`` highest-scoring hypotheses have ended: with
    ``alpha`` 0 no unfinished hypothesis can overtake them (log-probabilities only fall), so
    the result is exact. Done sentences leave the active batch, so later steps compute only
    for sentences still being decoded; decoding stops when none is left.
    """
    B, K = batch_size, beam
    state = state.select(torch.arange(B, device=device).repeat_interleave(K))
    limits = _limits(src_lengths, max_len_ratio, max_len_extra, max_len_cap).to(device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    ended = torch.zeros(B, K, dtype=torch.bool, device=device)    # emitted </s>
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)                        # sentences still decoding
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    slots = torch.arange(K, device=device)
    tok_hist, origin_hist, attn_hist = [], [], []
    for t in range(int(limits.max())):
        logits, state, weights = step(tokens, state)
        logp = torch.log_softmax(logits.float(), -1)
        A, V = active.numel(), logp.size(-1)
        fin = ended[active].view(-1)
        force_end = (t + 1 >= limits[active]).repeat_interleave(K) & ~fin
        logp[force_end] = float("-inf")
        logp[force_end, eos] = 0.0
        logp[fin] = float("-inf")          # an ended hypothesis only extends with padding, at no cost
        logp[fin, 0] = 0.0
        top, idx = (scores[active].unsqueeze(-1) + logp.view(A, K, V)).view(A, K * V).topk(K, dim=-1)
        origin, new = idx // V, idx % V
        was_ended = ended[active].gather(1, origin)
        now_ended = was_ended | (new == eos)
        lengths[active] = lengths[active].gather(1, origin) + (~was_ended).long()
        scores[active], ended[active] = top, now_ended
        # the full-batch history: finished sentences point to themselves and emit padding
        tok_full = torch.zeros(B, K, dtype=torch.long, device=device)
        tok_full[active] = new
        origin_full = slots.expand(B, K).clone()
        origin_full[active] = origin
        tok_hist.append(tok_full)
        origin_hist.append(origin_full)
        if weights is not None:
            w = torch.zeros(B, K, weights.size(-1), device=device)
            w[active] = weights.view(A, K, -1).gather(1, origin.unsqueeze(-1).expand(-1, -1, weights.size(-1)))
            attn_hist.append(w)
        keep = ~now_ended[:, :n_best].all(1)   # topk keeps each sentence's slots sorted by score
        if not bool(keep.any()):
            break
        rows = (origin + torch.arange(A, device=device).unsqueeze(1) * K)[keep].view(-1)
        state = state.select(rows)
        tokens = new[keep].view(-1)
        active = active[keep]
    normalised = (scores / length_penalty(lengths, alpha)).masked_fill(~ended, float("-inf"))
    order = normalised.argsort(dim=-1, descending=True)[:, :n_best]
    return _backtrack(order, normalised, tok_hist, origin_hist, attn_hist or [None] * len(tok_hist), eos)


def _backtrack(order, normalised, tok_hist, origin_hist, attn_hist, eos) -> list[list[Hypothesis]]:
    """Follow back-pointers from the chosen final slots to recover tokens and attention."""
    idx = order
    toks, attns = [], []
    for t in range(len(tok_hist) - 1, -1, -1):
        toks.append(tok_hist[t].gather(1, idx))
        if attn_hist[t] is not None:
            a = attn_hist[t]
            attns.append(a.gather(1, idx.unsqueeze(-1).expand(-1, -1, a.size(-1))))
        idx = origin_hist[t].gather(1, idx)
    seqs = torch.stack(toks[::-1], -1).tolist()                      # (B, n, T)
    weights = torch.stack(attns[::-1], 2).cpu() if attns else None   # (B, n, T, S)
    scores = normalised.gather(1, order).tolist()
    return [[_hypothesis(seq, scores[b][j], None if weights is None else weights[b, j], eos)
             for j, seq in enumerate(per_sentence)] for b, per_sentence in enumerate(seqs)]
