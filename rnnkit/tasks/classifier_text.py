"""What a sentence classifier does with text, whatever runs its arithmetic: reading labelled
files, encoding, scoring and the per-line predictions. The torch task and the onnxruntime
runtime share it (it imports neither).

A class that mixes it in has ``cfg``, ``words`` (a Vocab), ``labels``, ``label_index`` and
``predict_encoded(items, batch_size) -> (probabilities (N, C), attention per item or None,
mean loss over the items with a known label)``.
"""
from __future__ import annotations

from typing import Any

from rnnkit.data.labeled import read_labeled


def classification_scores(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (the mean of each label's F1) and the confusion matrix [gold][pred]."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    f1s = []
    for c in range(k):
        tp = confusion[c][c]
        pred_c, gold_c = sum(confusion[r][c] for r in range(k)), sum(confusion[c])
        prec = tp / pred_c if pred_c else 0.0
        rec = tp / gold_c if gold_c else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    correct = sum(confusion[c][c] for c in range(k))
    return {"accuracy": correct / max(1, len(gold)), "macro_f1": sum(f1s) / k, "confusion": confusion}


def format_prediction(d: dict[str, Any] | None, probs: bool = False, attention: bool = False) -> str:
    """A :meth:`ClassifierText.predict_details` entry as ``predict`` prints it."""
    if d is None:
        return ""
    text = d["label"] + (f"\t{d['probability']:.4f}" if probs else "")
    if attention and "attention" in d:
        text += "\t" + " ".join(f"{w}:{a:.3f}" for w, a in d["attention"])
    return text


class ClassifierText:
    cfg: Any
    words: Any
    labels: list[str]
    label_index: dict[str, int]

    def predict_encoded(self, items: list, batch_size: int):
        raise NotImplementedError

    def lm_inputs(self, tokens: list[str]) -> tuple:
        """What frozen LM features need of a sentence (nothing without them)."""
        return ()

    def read(self, path: str) -> list:
        items = read_labeled(path)
        if self.cfg.data.lowercase:
            items = [s._replace(tokens=[w.lower() for w in s.tokens]) for s in items]
        return items

    def encode(self, tokens: list[str], label: str | None = None) -> tuple:
        """Word ids and the label's id (-1 for a label the training data never showed)."""
        if self.cfg.data.lowercase:
            tokens = [w.lower() for w in tokens]
        return (self.words.encode(tokens), self.label_index.get(label, -1) if label is not None else 0,
                *self.lm_inputs(tokens))

    def score(self, sentences: list, batch_size: int) -> dict[str, Any]:
        """Loss, accuracy, macro-F1 and confusion matrix; a label the training data never
        showed is a class of its own (``<unseen>``) that no prediction matches."""
        items = [self.encode(s.tokens, s.label) for s in sentences]
        probs, _, loss = self.predict_encoded(items, batch_size)
        labels = list(self.labels)
        if any(x[1] < 0 for x in items):
            labels.append("<unseen>")
        gold = [x[1] if x[1] >= 0 else len(self.labels) for x in items]
        return {"loss": loss, **classification_scores(gold, probs.argmax(-1).tolist(), labels)}

    def evaluate_file(self, path: str, batch_size: int) -> dict[str, Any]:
        sentences = self.read(path)
        return {**self.score(sentences, batch_size), "labels": self.labels, "sentences": len(sentences)}

    def predict_details(self, lines: list[str], batch_size: int) -> list[dict[str, Any] | None]:
        """Per line of whitespace-separated words: the label, its probability, every label's,
        and with attention pooling each word's weight; None for an empty line."""
        items = [self.encode(line.split()) for line in lines]
        todo = [i for i, x in enumerate(items) if x[0]]
        p, weights, _ = self.predict_encoded([items[i] for i in todo], batch_size)
        out: list[dict[str, Any] | None] = [None] * len(lines)
        for row, i in enumerate(todo):
            best = int(p[row].argmax())
            out[i] = {"label": self.labels[best], "probability": float(p[row, best]),
                      "probabilities": {label: float(q) for label, q in zip(self.labels, p[row])}}
            if weights[row] is not None:
                out[i]["attention"] = list(zip(lines[i].split(), weights[row]))
        return out

    def predict(self, lines: list[str], batch_size: int, probs: bool = False,
                attention: bool = False) -> list[str]:
        """One label per line (with ``probs`` its probability, with ``attention`` each word's weight)."""
        return [format_prediction(d, probs, attention) for d in self.predict_details(lines, batch_size)]
