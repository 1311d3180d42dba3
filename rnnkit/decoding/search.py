"""Greedy and batched beam search over any step function.

A decoder here is anything with ``step(tokens (N,), state) -> (logits (N, V), state,
attention (N, S) or None)`` whose state has ``select(index)`` to reorder or expand rows.
Beam search keeps the whole batch times beam on the device as fixed-shape tensors: no
Python loop over sentences or hypotheses, only over time steps.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from rnnkit.hardware import pad_rows

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


def greedy_search(step: StepFn, state: Any, batch_size: int, bos: int, eos: int, src_lengths: torch.Tensor,
                  device: torch.device, max_len_ratio: float = 2.0, max_len_extra: int = 10,
                  max_len_cap: int = 512) -> list[Hypothesis]:
    """The most probable next token at every step: beam search with a beam of one."""
    found = beam_search(step, state, batch_size, bos, eos, src_lengths, device, beam=1,
                        max_len_ratio=max_len_ratio, max_len_extra=max_len_extra, max_len_cap=max_len_cap)
    return [hyps[0] for hyps in found]


def top_k(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, -1)`` of rows (R, V), faster on CPU for a vocabulary: torch's CPU topk
    sorts part of every row (about 6 us a row of 10,004 here, more than the log-softmax
    before it). The best k of a row lie in the k blocks of ``block`` columns with the highest
    maxima (or in the columns after the last whole block), so only those are sorted: 2.7x
    faster for 208 rows. Values are topk's; among equal values the index may differ."""
    rows, width = x.shape
    n = width // block
    if x.device.type != "cpu" or n <= k:
        return x.topk(k, dim=-1)
    blocks = x[:, : n * block].unflatten(1, (n, block))
    chosen = blocks.amax(-1).topk(k, dim=-1).indices                                   # (R, k)
    cand = blocks.gather(1, chosen.unsqueeze(-1).expand(rows, k, block)).flatten(1)
    cand = torch.cat([cand, x[:, n * block:]], 1)                                     # + the tail
    values, j = cand.topk(k, dim=-1)
    in_block = j < k * block
    index = torch.where(in_block, chosen.gather(1, (j // block).clamp(max=k - 1)) * block + j % block,
                        j - k * block + n * block)
    return values, index


def _hypothesis(seq: list[int], score: float, weights: torch.Tensor | None, eos: int) -> Hypothesis:
    """Cut a decoded row at its first </s> (padding follows it); keep attention up to and with </s>."""
    n = seq.index(eos) if eos in seq else len(seq)
    return Hypothesis(seq[:n], score, None if weights is None else weights[: n + 1])


@torch.no_grad()
def beam_search(step: StepFn, state: Any, batch_size: int, bos: int, eos: int, src_lengths: torch.Tensor,
                device: torch.device, beam: int = 5, n_best: int = 1, alpha: float = 0.0,
                max_len_ratio: float = 2.0, max_len_extra: int = 10,
                max_len_cap: int = 512) -> list[list[Hypothesis]]:
    """The ``n_best`` hypotheses per sentence, best first.

    Every sentence has ``beam`` slots. The model runs only on *live* hypotheses (one row
    each, in any order): not on ended ones, which stay in their slots at a fixed score, nor
    on sentences that are done, nor on the duplicate start slots. Of a row's continuations
    only its ``beam`` best can enter the beam, so each step ranks the live rows' top tokens
    together with the ended slots instead of whole vocabularies.

    A sentence is done once its ``n_best`` highest-scoring slots have ended: with ``alpha`` 0
    no live hypothesis can overtake them (log-probabilities only fall), so the result is
    exact. Decoding stops when no sentence is left.
    """
    B, K = batch_size, beam
    inf = float("-inf")
    limits = _limits(src_lengths, max_len_ratio, max_len_extra, max_len_cap).to(device)
    scores = torch.full((B, K), inf, device=device)
    scores[:, 0] = 0.0
    ended = torch.zeros(B, K, dtype=torch.bool, device=device)      # emitted </s>
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)                          # sentences still decoding
    slots = torch.arange(K, device=device)
    # the live rows: which active sentence (position in `active`) and slot each belongs to
    row_sent, row_slot = torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device)
    tokens = torch.full((B,), bos, dtype=torch.long, device=device)
    tok_hist, origin_hist, attn_hist = [], [], []
    for t in range(int(limits.max())):
        logits, state, weights = step(tokens, state)
        A, R = active.numel(), row_sent.numel()     # rows past R are padding (see below)
        # log-probabilities in fp32 whatever the model computes in, in one fused pass
        logp = torch.log_softmax(logits[:R], -1, dtype=torch.float32)
        weights = None if weights is None else weights[:R]
        top_v, top_i = top_k(logp, min(K, logp.size(-1)))
        sent = active[row_sent]
        base = scores[sent, row_slot]
        cand = base.unsqueeze(1) + top_v
        forced = t + 1 >= limits[sent]              # out of length: </s>, at no cost
        cand[forced] = inf
        cand[forced, 0] = base[forced]
        top_i[forced, 0] = eos
        # candidates per sentence: each live slot's best tokens, then the ended slots as they are
        table = torch.full((A, K, top_v.size(1)), inf, device=device)
        table[row_sent, row_slot] = cand
        table_tok = torch.zeros(A, K, top_v.size(1), dtype=torch.long, device=device)
        table_tok[row_sent, row_slot] = top_i
        carried = scores[active].masked_fill(~ended[active], inf)
        top, idx = torch.cat([table.view(A, -1), carried], 1).topk(K, dim=-1)
        n_live = table.size(1) * table.size(2)
        from_live = idx < n_live
        origin = torch.where(from_live, idx // table.size(2), idx - n_live)
        new = torch.where(from_live, table_tok.view(A, -1).gather(1, idx.clamp(max=n_live - 1)), 0)
        now_ended = ~from_live | (new == eos)
        lengths[active] = lengths[active].gather(1, origin) + from_live.long()
        scores[active], ended[active] = top, now_ended
        # the full-batch history: finished sentences point to themselves and emit padding
        tok_full = torch.zeros(B, K, dtype=torch.long, device=device)
        tok_full[active] = new
        origin_full = slots.expand(B, K).clone()
        origin_full[active] = origin
        tok_hist.append(tok_full)
        origin_hist.append(origin_full)
        row_of = torch.zeros(A, K, dtype=torch.long, device=device)    # live (sentence, slot) -> row
        row_of[row_sent, row_slot] = torch.arange(R, device=device)
        parent = row_of.gather(1, origin)
        if weights is not None:
            w = torch.zeros(B, K, weights.size(-1), device=device)
            w[active] = weights[parent].float() * from_live.unsqueeze(-1)   # fp32 history under autocast too
            attn_hist.append(w)
        dead = now_ended | (top == inf)
        keep = ~dead[:, :n_best].all(1)            # topk keeps each sentence's slots sorted by score
        live = ~dead & keep.unsqueeze(1)
        if not bool(live.any()):
            break
        sent_pos, slot = live.nonzero(as_tuple=True)
        # padded to a row count oneDNN has seen before; the copies' results are dropped above
        state = state.select(pad_rows(parent[sent_pos, slot]))
        tokens = pad_rows(new[sent_pos, slot])
        row_sent, row_slot = (keep.long().cumsum(0) - 1)[sent_pos], slot
        active = active[keep]
    normalised = (scores / length_penalty(lengths, alpha)).masked_fill(~ended, inf)
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
