"""What a translator does with text, whatever runs its arithmetic: tokenizing, batching by
length, beam search (:mod:`rnnkit.decoding.search`), ``--replace-unk`` and continuous
batching. The torch task and the onnxruntime runtime share it (it imports neither).

A class that mixes it in has ``cfg``, ``src_tok`` and ``tgt_tok`` (sentence tokenizers),
``bos`` and ``eos``, and:

- ``encode_ids(ids) -> (decoder state, source lengths)`` for a batch of encoded sources;
- ``search_backend()``: a fresh :class:`rnnkit.decoding.search.Backend` for one search;
- ``inference()``: a context manager around decoding (the torch task's evaluation mode).
"""
from __future__ import annotations

import sys
from typing import Any, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from rnnkit.data.vocab import UNK
from rnnkit.decoding.search import BeamSearch, Hypothesis, beam_search, greedy_search


class Translation(NamedTuple):
    text: str
    score: float
    src_tokens: list[str]
    tgt_tokens: list[str]
    attention: np.ndarray | None   # (len(tgt_tokens) + 1, len(src_tokens)), rows sum to 1; the mean over heads
    heads: np.ndarray | None = None  # with several heads: (heads, len(tgt_tokens) + 1, len(src_tokens))


EMPTY = Translation("", 0.0, [], [], None)


class TranslationText:
    cfg: Any
    src_tok: Any
    tgt_tok: Any
    bos: int
    eos: int

    def translate(self, lines: Sequence[str], beam: int = 1, n_best: int = 1, batch_size: int = 64,
                  alpha: float = 0.0, replace_unk: bool = False) -> list[Translation] | list[list[Translation]]:
        """Translate lines in order; an empty line gives an empty translation. With
        ``n_best`` > 1 each entry is a list of the n best translations."""
        src_tokens = [self.src_tok.split(line) for line in lines]
        todo = sorted((i for i, toks in enumerate(src_tokens) if toks), key=lambda i: len(src_tokens[i]))
        results: list[list[Translation]] = [[EMPTY] for _ in lines]
        bar = tqdm(total=len(todo), desc="translate", unit="sent", disable=None if len(todo) > batch_size else True,
                   file=sys.stderr, leave=False)    # shown only on a terminal, and only for long inputs
        with self.inference():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                state, lengths = self.encode_ids([self.src_tok.vocab.encode(src_tokens[i]) for i in chunk])
                for i, hyps in zip(chunk, self._search(state, lengths, beam, n_best, alpha)):
                    results[i] = [self._finish(h, src_tokens[i], replace_unk) for h in hyps]
                bar.update(len(chunk))
        bar.close()
        return results if n_best > 1 else [r[0] for r in results]

    def stream(self, beam: int = 1, n_best: int = 1, alpha: float = 0.0, replace_unk: bool = False,
               capacity: int = 32) -> "TranslationStream":
        """Continuous batching (see :class:`TranslationStream`)."""
        return TranslationStream(self, beam, n_best, alpha, replace_unk, capacity)

    def _search(self, state: Any, lengths: np.ndarray, beam: int, n_best: int, alpha: float) -> list[list[Hypothesis]]:
        m = self.cfg.model
        common = dict(backend=self.search_backend(), state=state, batch_size=len(lengths), bos=self.bos,
                      eos=self.eos, src_lengths=lengths, max_len_ratio=m.max_len_ratio, max_len_extra=m.max_len_extra)
        if beam == 1 and n_best == 1:
            return [[h] for h in greedy_search(**common)]
        return beam_search(**common, beam=beam, n_best=n_best, alpha=alpha)

    def _finish(self, hyp: Hypothesis, src_tokens: list[str], replace_unk: bool) -> Translation:
        out = self.tgt_tok.vocab.decode(hyp.tokens)
        attn = None if hyp.attention is None else hyp.attention[..., : len(src_tokens)]
        heads = None
        if attn is not None and attn.ndim == 3:          # (T, heads, S): the mean, and each head
            heads, attn = attn.transpose(1, 0, 2), attn.mean(1)
        if replace_unk and attn is not None:
            out = [src_tokens[int(attn[j].argmax())] if tok == UNK else tok for j, tok in enumerate(out)]
        return Translation(self.tgt_tok.join(out), hyp.score, src_tokens, out, attn, heads)

    # the abstract part
    def encode_ids(self, ids: list[list[int]]) -> tuple[Any, np.ndarray]:
        raise NotImplementedError

    def search_backend(self) -> Any:
        raise NotImplementedError

    def inference(self) -> Any:
        raise NotImplementedError


class TranslationStream:
    """Sentences decoded together while they come and go (continuous batching): :meth:`add`
    lines whenever there is :attr:`room`, call :meth:`step` while :attr:`live`; each step
    advances every sentence by one token and returns those that are done, so a server's batch
    stays full instead of waiting for its longest sentence. A line's translation is the one
    :meth:`TranslationText.translate` gives, up to float rounding in the padded batch."""

    def __init__(self, task: TranslationText, beam: int, n_best: int, alpha: float, replace_unk: bool,
                 capacity: int):
        m = task.cfg.model
        self.task, self.n_best, self.replace_unk = task, n_best, replace_unk
        self.search = BeamSearch(task.search_backend(), task.bos, task.eos, capacity, beam, n_best, alpha,
                                 m.max_len_ratio, m.max_len_extra)
        self._lines: dict[int, tuple[Any, list[str]]] = {}    # slot -> (tag, source tokens)

    @property
    def room(self) -> int:
        return self.search.room

    @property
    def live(self) -> int:
        return self.search.live

    def add(self, lines: Sequence[str], tags: Sequence[Any]) -> list[tuple[Any, Any]]:
        """Start decoding ``lines`` (at most :attr:`room`), each known by its tag from then on.
        Returns ``(tag, result)`` for the lines done at once (empty ones)."""
        tokens = [self.task.src_tok.split(line) for line in lines]
        done = [(tag, self._result([EMPTY])) for tag, t in zip(tags, tokens) if not t]
        todo = [(tag, t) for tag, t in zip(tags, tokens) if t]
        if todo:
            with self.task.inference():
                state, lengths = self.task.encode_ids([self.task.src_tok.vocab.encode(t) for _, t in todo])
            self._lines.update(zip(self.search.add(state, lengths), todo))
        return done

    def step(self) -> list[tuple[Any, Any]]:
        """One token for every live sentence; ``(tag, result)`` for each sentence now done."""
        with self.task.inference():
            slots = self.search.step()
        out = []
        for slot, hyps in zip(slots, self.search.finish(slots)):
            tag, src_tokens = self._lines.pop(slot)
            out.append((tag, self._result([self.task._finish(h, src_tokens, self.replace_unk) for h in hyps])))
        return out

    def _result(self, found: list[Translation]) -> Translation | list[Translation]:
        return found if self.n_best > 1 else found[0]
