"""Greedy and batched beam search over any step function.

A decoder here is anything with ``step(tokens (N,), state) -> (logits (N, V), state,
attention (N, S) or None)`` whose state has ``select(index)`` to reorder or expand rows.
Beam search keeps the whole batch times beam on the device as fixed-shape tensors: no
Python loop over sentences or hypotheses, only over time steps.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

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
    """The ``n_best`` hypotheses per sentence of one batch, best first (see :class:`BeamSearch`)."""
    search = BeamSearch(step, bos, eos, device, batch_size, beam, n_best, alpha,
                        max_len_ratio, max_len_extra, max_len_cap)
    search.add(state, src_lengths)           # slots 0 .. batch_size - 1, in order
    while search.live:
        search.step()
    return search.finish(range(batch_size))


class BeamSearch:
    """Beam search over a set of sentences that may change between steps.

    :func:`beam_search` decodes one batch with it. A server uses it for continuous batching:
    sentences join (:meth:`add`) whenever there is room, each :meth:`step` advances every
    sentence by one token, and a sentence leaves as soon as it is done (:meth:`finish`), so
    the batch stays full instead of waiting for its longest sentence.

    Every sentence has ``beam`` slots. The model runs only on *live* hypotheses (one row
    each, in any order): not on ended ones, which stay in their slots at a fixed score, nor
    on sentences that are done, nor on the duplicate start slots. Of a row's continuations
    only its ``beam`` best can enter the beam, so each step ranks the live rows' top tokens
    together with the ended slots instead of whole vocabularies.

    A sentence is done once its ``n_best`` highest-scoring slots have ended: with ``alpha`` 0
    no live hypothesis can overtake them (log-probabilities only fall), so the result is
    exact.

    Decoder states need ``select(index)``; to let sentences join a running search they also
    need ``join(other)`` (the rows of both, sources padded to the longer), and may offer
    ``narrow_source(width)`` (drop source positions past ``width``, once the longest
    sentences have left).
    """

    def __init__(self, step: StepFn, bos: int, eos: int, device: torch.device, capacity: int, beam: int = 5,
                 n_best: int = 1, alpha: float = 0.0, max_len_ratio: float = 2.0, max_len_extra: int = 10,
                 max_len_cap: int = 512):
        self._model_step, self.bos, self.eos, self.device = step, bos, eos, device
        self.capacity, self.beam, self.n_best, self.alpha = capacity, beam, n_best, alpha
        self._limit_args = (max_len_ratio, max_len_extra, max_len_cap)
        C, K = capacity, beam
        # per sentence slot (a sentence keeps its slot from add to finish)
        self.scores = torch.full((C, K), -math.inf, device=device)
        self.ended = torch.zeros(C, K, dtype=torch.bool, device=device)     # emitted </s>
        self.lengths = torch.zeros(C, K, dtype=torch.long, device=device)
        self.limits = torch.zeros(C, dtype=torch.long, device=device)       # most tokens, </s> included
        self.joined = torch.zeros(C, dtype=torch.long, device=device)       # the step it joined at
        self.src_lengths = torch.zeros(C, dtype=torch.long, device=device)
        self._free = list(range(C - 1, -1, -1))        # pop() hands out the lowest slot first
        self._slot_ids = torch.arange(K, device=device)
        self.active = torch.zeros(0, dtype=torch.long, device=device)      # sentences decoding
        # the live rows: which active sentence (position in `active`) and slot each belongs to
        self.row_sent = torch.zeros(0, dtype=torch.long, device=device)
        self.row_slot = torch.zeros(0, dtype=torch.long, device=device)
        self.state: Any = None
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)   # each live row's last token
        self._state_rows = 0                   # rows of `state`, padding included
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None   # rows of `state` to go on with, their tokens
        self._joining: list[tuple[Any, torch.Tensor]] = []
        self.t = 0                             # steps taken
        self._first = 0                        # the step of the history's first entry
        self._tok: list[torch.Tensor] = []     # per step (C, K): token chosen into each slot
        self._origin: list[torch.Tensor] = []  # per step (C, K): the slot it extends
        self._attn: list[torch.Tensor | None] = []

    @property
    def room(self) -> int:
        """How many more sentences can join."""
        return len(self._free)

    @property
    def live(self) -> int:
        """Sentences being decoded (joined and not yet done)."""
        return self.active.numel() + sum(ix.numel() for _, ix in self._joining)

    def add(self, state: Any, src_lengths: torch.Tensor) -> list[int]:
        """Sentences (their decoder ``state`` at the start, one row each) that join at the next
        step; returns their slots, for :meth:`finish`."""
        n = src_lengths.numel()
        if n > self.room:
            raise ValueError(f"{n} sentences cannot join: room for {self.room}")
        slots = [self._free.pop() for _ in range(n)]
        ix = torch.tensor(slots, device=self.device)
        self.scores[ix] = -math.inf
        self.scores[ix, 0] = 0.0
        self.ended[ix] = False
        self.lengths[ix] = 0
        self.limits[ix] = _limits(src_lengths, *self._limit_args).to(self.device)
        self.joined[ix] = self.t
        self.src_lengths[ix] = src_lengths.to(self.device)
        self._joining.append((state, ix))
        return slots

    def _admit(self) -> None:
        """The state and tokens for this step: the surviving rows, then the joining sentences."""
        joining, self._joining = self._joining, []
        going_on = self._next is not None and self._next[0].numel() > 0
        if not going_on and not joining:              # every sentence has left: nothing to run
            return
        if not going_on and len(joining) == 1:        # a fresh batch: the encoder's rows as they are
            state, ix = joining[0]
            self.state, self._state_rows = state, ix.numel()
            self.tokens = torch.full((ix.numel(),), self.bos, dtype=torch.long, device=self.device)
            self.active = ix
            self.row_sent = torch.arange(ix.numel(), device=self.device)
            self.row_slot = torch.zeros(ix.numel(), dtype=torch.long, device=self.device)
            return
        state, rows = (self.state, [self._next[0]]) if going_on else (None, [])
        tokens = [self._next[1]] if going_on else []
        offset = self._state_rows if going_on else 0
        for st, ix in joining:
            state = st if state is None else state.join(st)
            rows.append(torch.arange(offset, offset + ix.numel(), device=self.device))
            tokens.append(torch.full((ix.numel(),), self.bos, dtype=torch.long, device=self.device))
            self.row_sent = torch.cat([self.row_sent, self.active.numel() + torch.arange(ix.numel(), device=self.device)])
            self.row_slot = torch.cat([self.row_slot, torch.zeros_like(ix)])
            self.active = torch.cat([self.active, ix])
            offset += ix.numel()
        if hasattr(state, "narrow_source"):
            state = state.narrow_source(int(self.src_lengths[self.active].max()))
        # under CPU autocast, padded to a row count oneDNN has built a bf16 kernel for (see
        # rnnkit.hardware.ROW_MULTIPLE); the copies' results are dropped in step. fp32 and int8
        # products build no kernel per shape, so there the copies would be work for nothing.
        pad = pad_rows if torch.is_autocast_enabled(self.device.type) else _unpadded
        index = pad(torch.cat(rows))
        self.state, self._state_rows = state.select(index), index.numel()
        self.tokens = pad(torch.cat(tokens))

    @torch.no_grad()
    def step(self) -> list[int]:
        """Advance every live sentence by one token; returns the slots of those now done."""
        if self._joining or self._next is not None:
            self._admit()
        self._next = None
        if not self.active.numel():
            return []
        C, K, inf, device = self.capacity, self.beam, -math.inf, self.device
        active, row_sent, row_slot = self.active, self.row_sent, self.row_slot
        logits, state, weights = self._model_step(self.tokens, self.state)
        A, R = active.numel(), row_sent.numel()     # rows past R are padding
        # log-probabilities in fp32 whatever the model computes in, in one fused pass
        logp = torch.log_softmax(logits[:R], -1, dtype=torch.float32)
        weights = None if weights is None else weights[:R]
        top_v, top_i = top_k(logp, min(K, logp.size(-1)))
        sent = active[row_sent]
        base = self.scores[sent, row_slot]
        cand = base.unsqueeze(1) + top_v
        forced = self.t - self.joined[sent] + 1 >= self.limits[sent]    # out of length: </s>, at no cost
        cand[forced] = inf
        cand[forced, 0] = base[forced]
        top_i[forced, 0] = self.eos
        # candidates per sentence: each live slot's best tokens, then the ended slots as they are
        table = torch.full((A, K, top_v.size(1)), inf, device=device)
        table[row_sent, row_slot] = cand
        table_tok = torch.zeros(A, K, top_v.size(1), dtype=torch.long, device=device)
        table_tok[row_sent, row_slot] = top_i
        carried = self.scores[active].masked_fill(~self.ended[active], inf)
        top, idx = torch.cat([table.view(A, -1), carried], 1).topk(K, dim=-1)
        n_live = table.size(1) * table.size(2)
        from_live = idx < n_live
        origin = torch.where(from_live, idx // table.size(2), idx - n_live)
        new = torch.where(from_live, table_tok.view(A, -1).gather(1, idx.clamp(max=n_live - 1)), 0)
        now_ended = ~from_live | (new == self.eos)
        self.lengths[active] = self.lengths[active].gather(1, origin) + from_live.long()
        self.scores[active], self.ended[active] = top, now_ended
        # the history of every slot: sentences not decoding point to themselves and emit padding
        tok_all = torch.zeros(C, K, dtype=torch.long, device=device)
        tok_all[active] = new
        origin_all = self._slot_ids.expand(C, K).clone()
        origin_all[active] = origin
        self._tok.append(tok_all)
        self._origin.append(origin_all)
        row_of = torch.zeros(A, K, dtype=torch.long, device=device)    # live (sentence, slot) -> row
        row_of[row_sent, row_slot] = torch.arange(R, device=device)
        parent = row_of.gather(1, origin)
        if weights is not None:
            w = torch.zeros(C, K, weights.size(-1), device=device)
            w[active] = weights[parent].float() * from_live.unsqueeze(-1)   # fp32 history under autocast too
            self._attn.append(w)
        else:
            self._attn.append(None)
        self.t += 1
        dead = now_ended | (top == inf)
        keep = ~dead[:, :self.n_best].all(1)      # topk keeps each sentence's slots sorted by score
        live = ~dead & keep.unsqueeze(1)
        sent_pos, slot = live.nonzero(as_tuple=True)
        self.state = state
        self._next = (parent[sent_pos, slot], new[sent_pos, slot])
        self.row_sent, self.row_slot = (keep.long().cumsum(0) - 1)[sent_pos], slot
        done = active[~keep].tolist()
        self.active = active[keep]
        return done

    def finish(self, slots: Sequence[int]) -> list[list[Hypothesis]]:
        """The ``n_best`` hypotheses, best first, of each done sentence in ``slots``; frees the slots."""
        ix = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        if not ix.numel():
            return []
        normalised = (self.scores[ix] / length_penalty(self.lengths[ix], self.alpha)).masked_fill(~self.ended[ix],
                                                                                                 -math.inf)
        order = normalised.argsort(dim=-1, descending=True)[:, :self.n_best]
        since = int(self.joined[ix].min()) - self._first
        found = _backtrack(ix, order, normalised, self._tok[since:], self._origin[since:], self._attn[since:],
                           (self.joined[ix] - self._first - since).tolist(), self.eos)
        self._free.extend(reversed(list(slots)))
        if not self.live:                          # nothing refers to the history any more
            self._tok, self._origin, self._attn, self._first = [], [], [], self.t
        else:                                      # drop what only finished sentences referred to
            oldest = int(self.joined[self.active].min()) if self.active.numel() else self.t
            cut = oldest - self._first
            del self._tok[:cut], self._origin[:cut], self._attn[:cut]
            self._first += cut
        return found


def _unpadded(t: torch.Tensor) -> torch.Tensor:
    return t


def _backtrack(ix, order, normalised, tok_hist, origin_hist, attn_hist, starts, eos) -> list[list[Hypothesis]]:
    """Follow back-pointers from the chosen final slots of sentences ``ix`` to recover their
    tokens and attention; sentence ``b``'s own history begins at ``starts[b]``."""
    idx = order
    toks, attns = [], []
    for t in range(len(tok_hist) - 1, -1, -1):
        toks.append(tok_hist[t][ix].gather(1, idx))
        if attn_hist[t] is not None:
            a = attn_hist[t][ix]
            attns.append(a.gather(1, idx.unsqueeze(-1).expand(-1, -1, a.size(-1))))
        idx = origin_hist[t][ix].gather(1, idx)
    seqs = torch.stack(toks[::-1], -1).tolist()                      # (B, n, T)
    weights = None
    if attns:                                  # sources were narrower at some steps: pad to the widest
        width = max(a.size(-1) for a in attns)
        weights = torch.stack([F.pad(a, (0, width - a.size(-1))) for a in attns[::-1]], 2).cpu()   # (B, n, T, S)
    scores = normalised.gather(1, order).tolist()
    return [[_hypothesis(seq[starts[b]:], scores[b][j], None if weights is None else weights[b, j, starts[b]:], eos)
             for j, seq in enumerate(per_sentence)] for b, per_sentence in enumerate(seqs)]
