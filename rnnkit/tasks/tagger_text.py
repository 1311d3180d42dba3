"""What a tagger does with text, whatever runs its arithmetic: reading tagged files, encoding
words and their characters, scoring against gold tags (accuracy, spans) and per-line tags.
The torch task and the onnxruntime runtime share it (it imports neither).

A class that mixes it in has ``cfg``, ``words``, ``chars`` (Vocabs), ``tags``, ``tag_index``,
``spans`` and ``predict_encoded(items, batch_size) -> (tags per item, summed loss, words
counted in it)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rnnkit.data.labeled import read_tagged, select
from rnnkit.spans import span_scores


class TaggerText:
    cfg: Any
    words: Any
    chars: Any
    tags: list[str]
    tag_index: dict[str, int]
    spans: bool

    def predict_encoded(self, items: list, batch_size: int) -> tuple[list[list[str]], float, int]:
        raise NotImplementedError

    def lm_inputs(self, tokens: Sequence[str]) -> tuple:
        """What frozen LM features need of a sentence (nothing without them)."""
        return ()

    def read(self, path: str, span: list[int] | None = None, key: str = "") -> list:
        d = self.cfg.data
        return select(read_tagged(path, d.format, d.token_column, d.tag_column), span, key, path)

    def word_forms(self, tokens: Sequence[str]) -> list[str]:
        return [w.lower() for w in tokens] if self.cfg.data.lowercase else list(tokens)

    def encode(self, tokens: Sequence[str], tags: Sequence[str] | None = None) -> tuple:
        """Ids; a tag the training data never showed gets -1 (it counts as wrong, not in the loss)."""
        limit = self.cfg.data.max_word_length
        chars = [self.chars.encode(w[:limit]) for w in tokens]
        tag_ids = [self.tag_index.get(t, -1) for t in tags] if tags is not None else [0] * len(tokens)
        return (self.words.encode(self.word_forms(tokens)), chars, tag_ids, *self.lm_inputs(tokens))

    def score(self, sentences: list, batch_size: int) -> dict[str, Any]:
        """Loss, token accuracy and, for BIO/BIOES tag sets, span precision/recall/F1."""
        items = [self.encode(s.tokens, s.tags) for s in sentences]
        pred, total, counted = self.predict_encoded(items, batch_size)
        gold = [s.tags for s in sentences]
        tokens = sum(len(g) for g in gold)
        correct = sum(p == g for ps, gs in zip(pred, gold) for p, g in zip(ps, gs))
        out: dict[str, Any] = {"loss": total / max(1, counted), "accuracy": correct / tokens}
        if self.spans:
            scores = span_scores(gold, pred)
            overall = scores.pop("overall")
            out.update(precision=overall["precision"], recall=overall["recall"], f1=overall["f1"])
            out["per_type"] = scores
        return out

    def evaluate_file(self, path: str, batch_size: int) -> dict[str, Any]:
        sentences = self.read(path)
        return {**self.score(sentences, batch_size), "sentences": len(sentences),
                "tokens": sum(len(s.tokens) for s in sentences)}

    def predict(self, lines: list[str], batch_size: int, probs: bool = False) -> list[str]:
        """One line of space-separated tags per line of space-separated words."""
        items = [self.encode(line.split()) for line in lines]
        todo = [i for i, x in enumerate(items) if x[0]]
        tags, _, _ = self.predict_encoded([items[i] for i in todo], batch_size)
        out = [""] * len(lines)
        for i, t in zip(todo, tags):
            out[i] = " ".join(t)
        return out


def viterbi(emissions: np.ndarray, length: int, transitions: np.ndarray, start: np.ndarray,
            end: np.ndarray) -> list[int]:
    """The best tag sequence of one sentence's emissions (L, T) under a linear-chain CRF."""
    score = start + emissions[0]
    back = []
    for t in range(1, length):
        total = score[:, None] + transitions              # [previous, next]
        back.append(total.argmax(0))
        score = total.max(0) + emissions[t]
    tag = int((score + end).argmax())
    path = [tag]
    for arg in reversed(back):
        tag = int(arg[tag])
        path.append(tag)
    return path[::-1]


def crf_nll(emissions: np.ndarray, tags: Sequence[int], transitions: np.ndarray, start: np.ndarray,
            end: np.ndarray) -> float:
    """-log p(tags) of one sentence's emissions (n, T): the forward algorithm against the path's score."""
    emissions = emissions.astype(np.float64)
    alpha = start + emissions[0]
    for t in range(1, len(tags)):
        m = alpha[:, None] + transitions + emissions[t][None, :]
        top = m.max(0)
        alpha = top + np.log(np.exp(m - top).sum(0))
    last = alpha + end
    log_z = last.max() + np.log(np.exp(last - last.max()).sum())
    path = start[tags[0]] + sum(emissions[t, y] for t, y in enumerate(tags)) + end[tags[-1]] \
        + sum(transitions[a, b] for a, b in zip(tags, tags[1:]))
    return float(log_z - path)
