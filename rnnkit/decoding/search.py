"""Greedy and batched beam search over any decoder backend, in numpy (no torch).

A backend runs the model; the search keeps the books. It has
``step(tokens (N,), state, k) -> (log-probabilities (N, k) of each row's k best next tokens,
those tokens (N, k), attention weights (N, S) (several heads: (N, heads, S)) or None, next
state)`` and
``select(state, index)``, which reorders or expands rows; to let sentences join a running
search it also has ``join(a, b)`` (the rows of both, sources padded to the longer) and
``narrow_source(state, width)``. :mod:`rnnkit.decoding.torch_steps` is the backend of torch
models, :mod:`rnnkit.runtime.translator` that of exported ones: both decode with this code,
step for step. The books are small fixed-shape arrays for the whole batch times beam: no
Python loop over sentences or hypotheses, only over time steps.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np


class Backend(Protocol):
    def step(self, tokens: np.ndarray, state: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Any]: ...
    def select(self, state: Any, index: np.ndarray) -> Any: ...
    def join(self, a: Any, b: Any) -> Any: ...
    def narrow_source(self, state: Any, width: int) -> Any: ...


class Hypothesis(NamedTuple):
    tokens: list[int]                 # without <s> and </s>
    score: float                      # log-probability (length-normalised for beam search)
    attention: np.ndarray | None      # (len(tokens) + 1, S) weights (heads: (.., heads, S)), the </s> step included


def _limits(src_lengths: np.ndarray, ratio: float, extra: int, cap: int) -> np.ndarray:
    return np.clip((src_lengths.astype(np.float64) * ratio + extra).astype(np.int64), 1, cap)


def length_penalty(lengths: np.ndarray, alpha: float) -> np.ndarray:
    """GNMT's ((5 + |Y|) / 6) ** alpha; alpha 0 ranks by raw log-probability."""
    return ((5.0 + lengths) / 6.0) ** alpha


def _lengths(src_lengths: Any) -> np.ndarray:
    return np.asarray(src_lengths, dtype=np.int64).reshape(-1)


def greedy_search(backend: Backend, state: Any, batch_size: int, bos: int, eos: int, src_lengths: Any,
                  max_len_ratio: float = 2.0, max_len_extra: int = 10, max_len_cap: int = 512) -> list[Hypothesis]:
    """The most probable next token at every step: beam search with a beam of one."""
    found = beam_search(backend, state, batch_size, bos, eos, src_lengths, beam=1, max_len_ratio=max_len_ratio,
                        max_len_extra=max_len_extra, max_len_cap=max_len_cap)
    return [hyps[0] for hyps in found]


def beam_search(backend: Backend, state: Any, batch_size: int, bos: int, eos: int, src_lengths: Any,
                beam: int = 5, n_best: int = 1, alpha: float = 0.0, max_len_ratio: float = 2.0,
                max_len_extra: int = 10, max_len_cap: int = 512) -> list[list[Hypothesis]]:
    """The ``n_best`` hypotheses per sentence of one batch, best first (see :class:`BeamSearch`)."""
    search = BeamSearch(backend, bos, eos, batch_size, beam, n_best, alpha, max_len_ratio, max_len_extra,
                        max_len_cap)
    search.add(state, src_lengths)           # slots 0 .. batch_size - 1, in order
    while search.live:
        search.step()
    return search.finish(range(batch_size))


def _hypothesis(seq: list[int], score: float, weights: np.ndarray | None, eos: int) -> Hypothesis:
    """Cut a decoded row at its first </s> (padding follows it); keep attention up to and with </s>."""
    n = seq.index(eos) if eos in seq else len(seq)
    return Hypothesis(seq[:n], score, None if weights is None else weights[: n + 1])


def _best_first(x: np.ndarray, k: int) -> np.ndarray:
    """The column indices of each row's ``k`` largest values, largest first (ties: lower index first)."""
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


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
    """

    def __init__(self, backend: Backend, bos: int, eos: int, capacity: int, beam: int = 5, n_best: int = 1,
                 alpha: float = 0.0, max_len_ratio: float = 2.0, max_len_extra: int = 10, max_len_cap: int = 512):
        self.backend, self.bos, self.eos = backend, bos, eos
        self.capacity, self.beam, self.n_best, self.alpha = capacity, beam, n_best, alpha
        self._limit_args = (max_len_ratio, max_len_extra, max_len_cap)
        C, K = capacity, beam
        # per sentence slot (a sentence keeps its slot from add to finish)
        self.scores = np.full((C, K), -math.inf)
        self.ended = np.zeros((C, K), bool)               # emitted </s>
        self.lengths = np.zeros((C, K), np.int64)
        self.limits = np.zeros(C, np.int64)               # most tokens, </s> included
        self.joined = np.zeros(C, np.int64)               # the step it joined at
        self.src_lengths = np.zeros(C, np.int64)
        self._free = list(range(C - 1, -1, -1))           # pop() hands out the lowest slot first
        self._slot_ids = np.arange(K)
        self.active = np.zeros(0, np.int64)               # sentences decoding
        # the live rows: which active sentence (position in `active`) and slot each belongs to
        self.row_sent = np.zeros(0, np.int64)
        self.row_slot = np.zeros(0, np.int64)
        self.state: Any = None
        self.tokens = np.zeros(0, np.int64)               # each live row's last token
        self._next: tuple[np.ndarray, np.ndarray] | None = None   # rows of `state` to go on with, their tokens
        self._state_rows = 0
        self._joining: list[tuple[Any, np.ndarray]] = []
        self.t = 0                             # steps taken
        self._first = 0                        # the step of the history's first entry
        self._tok: list[np.ndarray] = []       # per step (C, K): token chosen into each slot
        self._origin: list[np.ndarray] = []    # per step (C, K): the slot it extends
        self._attn: list[np.ndarray | None] = []

    @property
    def room(self) -> int:
        """How many more sentences can join."""
        return len(self._free)

    @property
    def live(self) -> int:
        """Sentences being decoded (joined and not yet done)."""
        return self.active.size + sum(ix.size for _, ix in self._joining)

    def add(self, state: Any, src_lengths: Any) -> list[int]:
        """Sentences (their decoder ``state`` at the start, one row each) that join at the next
        step; returns their slots, for :meth:`finish`."""
        lengths = _lengths(src_lengths)
        n = lengths.size
        if n > self.room:
            raise ValueError(f"{n} sentences cannot join: room for {self.room}")
        slots = [self._free.pop() for _ in range(n)]
        ix = np.asarray(slots, np.int64)
        self.scores[ix] = -math.inf
        self.scores[ix, 0] = 0.0
        self.ended[ix] = False
        self.lengths[ix] = 0
        self.limits[ix] = _limits(lengths, *self._limit_args)
        self.joined[ix] = self.t
        self.src_lengths[ix] = lengths
        self._joining.append((state, ix))
        return slots

    def _admit(self) -> None:
        """The state and tokens for this step: the surviving rows, then the joining sentences."""
        joining, self._joining = self._joining, []
        going_on = self._next is not None and self._next[0].size > 0
        if not going_on and not joining:              # every sentence has left: nothing to run
            return
        state, rows = (self.state, [self._next[0]]) if going_on else (None, [])
        tokens = [self._next[1]] if going_on else []
        offset = self._state_rows if going_on else 0
        row_sent, row_slot, active = [self.row_sent], [self.row_slot], [self.active]
        n_active = self.active.size
        for st, ix in joining:
            state = st if state is None else self.backend.join(state, st)
            rows.append(np.arange(offset, offset + ix.size))
            tokens.append(np.full(ix.size, self.bos, np.int64))
            row_sent.append(n_active + np.arange(ix.size))
            row_slot.append(np.zeros(ix.size, np.int64))
            active.append(ix)
            n_active += ix.size
            offset += ix.size
        self.row_sent, self.row_slot = np.concatenate(row_sent), np.concatenate(row_slot)
        self.active = np.concatenate(active)
        # drop source positions that only sentences now gone had
        state = self.backend.narrow_source(state, int(self.src_lengths[self.active].max()))
        index = np.concatenate(rows)
        self.state, self._state_rows = self.backend.select(state, index), index.size
        self.tokens = np.concatenate(tokens)

    def step(self) -> list[int]:
        """Advance every live sentence by one token; returns the slots of those now done."""
        if self._joining or self._next is not None:
            self._admit()
        self._next = None
        if not self.active.size:
            return []
        C, K, inf = self.capacity, self.beam, -math.inf
        active, row_sent, row_slot = self.active, self.row_sent, self.row_slot
        top_v, top_i, weights, state = self.backend.step(self.tokens, self.state, K)
        A, R, k = active.size, row_sent.size, top_v.shape[1]
        top_i = np.array(top_i, np.int64)          # a copy: forced rows are written into it
        sent = active[row_sent]
        base = self.scores[sent, row_slot]
        cand = base[:, None] + top_v
        forced = self.t - self.joined[sent] + 1 >= self.limits[sent]    # out of length: </s>, at no cost
        cand[forced] = inf
        cand[forced, 0] = base[forced]
        top_i[forced, 0] = self.eos
        # candidates per sentence: each live slot's best tokens, then the ended slots as they are
        table = np.full((A, K, k), inf)
        table[row_sent, row_slot] = cand
        table_tok = np.zeros((A, K, k), np.int64)
        table_tok[row_sent, row_slot] = top_i
        carried = np.where(self.ended[active], self.scores[active], inf)
        every = np.concatenate([table.reshape(A, -1), carried], 1)
        idx = _best_first(every, K)
        top = np.take_along_axis(every, idx, 1)
        n_live = K * k
        from_live = idx < n_live
        origin = np.where(from_live, idx // k, idx - n_live)
        new = np.where(from_live, np.take_along_axis(table_tok.reshape(A, -1), np.minimum(idx, n_live - 1), 1), 0)
        now_ended = ~from_live | (new == self.eos)
        self.lengths[active] = np.take_along_axis(self.lengths[active], origin, 1) + from_live
        self.scores[active], self.ended[active] = top, now_ended
        # the history of every slot: sentences not decoding point to themselves and emit padding
        tok_all = np.zeros((C, K), np.int64)
        tok_all[active] = new
        origin_all = np.tile(self._slot_ids, (C, 1))
        origin_all[active] = origin
        self._tok.append(tok_all)
        self._origin.append(origin_all)
        row_of = np.zeros((A, K), np.int64)          # live (sentence, slot) -> row
        row_of[row_sent, row_slot] = np.arange(R)
        parent = np.take_along_axis(row_of, origin, 1)
        if weights is not None:
            w = np.zeros((C, K, *weights.shape[1:]), np.float32)
            w[active] = weights[parent] * from_live.reshape(*from_live.shape, *[1] * (weights.ndim - 1))
            self._attn.append(w)
        else:
            self._attn.append(None)
        self.t += 1
        dead = now_ended | (top == inf)
        keep = ~dead[:, :self.n_best].all(1)      # each sentence's slots are sorted by score
        live = ~dead & keep[:, None]
        sent_pos, slot = np.nonzero(live)
        self.state = state
        self._next = (parent[sent_pos, slot], new[sent_pos, slot])
        self.row_sent, self.row_slot = (np.cumsum(keep) - 1)[sent_pos], slot
        done = active[~keep].tolist()
        self.active = active[keep]
        return done

    def finish(self, slots: Sequence[int]) -> list[list[Hypothesis]]:
        """The ``n_best`` hypotheses, best first, of each done sentence in ``slots``; frees the slots."""
        ix = np.asarray(list(slots), np.int64)
        if not ix.size:
            return []
        normalised = np.where(self.ended[ix], self.scores[ix] / length_penalty(self.lengths[ix], self.alpha),
                              -math.inf)
        order = _best_first(normalised, self.n_best)
        since = int(self.joined[ix].min()) - self._first
        found = _backtrack(ix, order, normalised, self._tok[since:], self._origin[since:], self._attn[since:],
                           (self.joined[ix] - self._first - since).tolist(), self.eos)
        self._free.extend(reversed(list(slots)))
        if not self.live:                          # nothing refers to the history any more
            self._tok, self._origin, self._attn, self._first = [], [], [], self.t
        else:                                      # drop what only finished sentences referred to
            oldest = int(self.joined[self.active].min()) if self.active.size else self.t
            cut = oldest - self._first
            del self._tok[:cut], self._origin[:cut], self._attn[:cut]
            self._first += cut
        return found


def _backtrack(ix, order, normalised, tok_hist, origin_hist, attn_hist, starts, eos) -> list[list[Hypothesis]]:
    """Follow back-pointers from the chosen final slots of sentences ``ix`` to recover their
    tokens and attention; sentence ``b``'s own history begins at ``starts[b]``."""
    idx = order
    toks, attns = [], []
    for t in range(len(tok_hist) - 1, -1, -1):
        toks.append(np.take_along_axis(tok_hist[t][ix], idx, 1))
        if attn_hist[t] is not None:
            a = attn_hist[t][ix]                   # (B, K, [heads,] S)
            attns.append(np.take_along_axis(a, idx.reshape(*idx.shape, *[1] * (a.ndim - 2)), 1))
        idx = np.take_along_axis(origin_hist[t][ix], idx, 1)
    seqs = np.stack(toks[::-1], -1).tolist() if toks else [[[] for _ in range(order.shape[1])] for _ in ix]
    weights = None
    if attns:                                  # sources were narrower at some steps: pad to the widest
        width = max(a.shape[-1] for a in attns)
        weights = np.stack([np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]) for a in attns[::-1]], 2)
    scores = np.take_along_axis(normalised, order, 1).tolist()
    return [[_hypothesis(seq[starts[b]:], scores[b][j], None if weights is None else weights[b, j, starts[b]:], eos)
             for j, seq in enumerate(per_sentence)] for b, per_sentence in enumerate(seqs)]
