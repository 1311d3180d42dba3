"""What a language model does with text, whatever runs its arithmetic: the torch task and the
onnxruntime runtime share it (it imports neither torch nor onnxruntime).

A class that mixes it in has ``cfg`` (the run's config), ``vocab``, ``tokenizer`` and
``step(ids, state) -> (log_probs, state)`` (see :mod:`rnnkit.decoding.lm_loop`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator

import numpy as np

from rnnkit.config import ConfigError
from rnnkit.data.vocab import EOS
from rnnkit.decoding import lm_loop
from rnnkit.decoding.streams import LMStreams
from rnnkit.metrics import perplexity


class LanguageModelText:
    cfg: Any
    vocab: Any
    tokenizer: Any

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` in reading order (right to left for a backward LM)."""
        ids = self.vocab.encode(self.tokenizer.split(text))
        return ids[::-1] if self.cfg.data.reverse else ids

    def encode_piece(self, text: str) -> list[int]:
        """Token ids of a piece of a longer text: a word LM ends a line only at a line break in
        the piece (``encode`` ends every text's last line)."""
        if self.cfg.data.tokenizer == "char":
            return self.vocab.encode(list(text))
        return self.vocab.encode([EOS if t == "\n" else t for t in re.findall(r"[^\s]+|\n", text)])

    def metrics(self, loss: float, tokens: int) -> dict[str, float]:
        out = {"loss": loss, "ppl": perplexity(loss)}
        if self.cfg.data.tokenizer == "char":
            out["bpc"] = loss / math.log(2)
        return out

    def generate(self, prime: str, length: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield ``length`` sampled tokens (as text pieces) after feeding ``prime``; the same
        seed gives the same text on the same backend."""
        ids = self.encode(prime) if prime else []
        if not ids:  # start from a line break (or the first ordinary token)
            start = "\n" if self.cfg.data.tokenizer == "char" else EOS
            ids = [self.vocab.stoi.get(start, len(self.vocab) - 1)]
        word = self.cfg.data.tokenizer == "word"
        for token in lm_loop.generate(self, ids, length, temperature, top_k, top_p, seed, banned=[self.vocab.unk]):
            text = self.vocab.itos[token]
            yield ("\n" if text == EOS else text + " ") if word else text

    def cache_loss(self, stream: np.ndarray, size: int, theta: float, lam: float,
                   progress=iter) -> tuple[float, float, int]:
        """Mean loss per token without and with the continuous cache (:func:`lm_loop.cache_probs`)
        over a (rows, length) id stream, mixed as ``(1 - lam) p_model + lam p_cache`` where the
        cache has history."""
        hidden, p_model, words = lm_loop.stream_states(self, stream, self.cfg.data.bptt, progress)
        p_cache, seen = lm_loop.cache_probs(hidden, words, size, theta)
        return float(-np.log(p_model).mean()), lm_loop.cache_mix_loss(p_model, p_cache, seen, lam), p_model.size

    def incremental(self) -> lm_loop.Incremental:
        """Feed text a piece at a time and read the next-token distribution after each."""
        self._forward_only()
        return lm_loop.Incremental(self, self.encode_piece, self.vocab.itos)

    def streams(self, max_tokens: int = 4096) -> LMStreams:
        """Many texts fed a piece at a time, stepped together (:class:`LMStreams`)."""
        self._forward_only()
        return LMStreams(self, self.encode_piece, self.vocab.itos, self.cfg.data.tokenizer == "word",
                         self.vocab.unk, max_tokens)

    def _forward_only(self) -> None:
        if self.cfg.data.reverse:
            raise ConfigError("", "a backward LM (data.reverse) reads text right to left; it cannot be fed "
                                  "left to right")
