"""What a sentence or document classifier does with text, whatever runs its arithmetic:
reading labelled files, encoding, scoring and the per-line predictions. The torch task and the
onnxruntime runtime share it (it imports neither).

A class that mixes it in has ``cfg``, ``words`` (a Vocab), ``labels``, ``label_index`` and
``predict_encoded(items, batch_size) -> (probabilities (N, C), attention per item or None,
mean loss over the items with a known label)``. An item's attention is a list of weights per
word, a list of such lists (attention hops), or for the hierarchical network a pair: each
sentence's weight, and each word's weight within its sentence.
"""
from __future__ import annotations

from typing import Any

from rnnkit.data.documents import Document, parse_document, read_documents
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


def _pairs(pairs: list) -> str:
    return " ".join(f"{w}:{a:.3f}" for w, a in pairs)


def format_prediction(d: dict[str, Any] | None, probs: bool = False, attention: bool = False,
                      hops: bool = False) -> str:
    """A :meth:`ClassifierText.predict_details` entry as ``predict`` prints it, on one line:
    the label (a tab, its probability), then with ``attention`` a tab and each word's weight
    as ``word:weight`` (documents: each sentence's weight in brackets before its words, the
    words' weights within their sentence, sentences apart by `` | ``), and with ``hops`` a
    tab and each hop's weights after that."""
    if d is None:
        return ""
    text = d["label"] + (f"\t{d['probability']:.4f}" if probs else "")
    if attention and "sentences" in d:
        text += "\t" + " | ".join(f"[{s['weight']:.3f}] {_pairs(s['words'])}" for s in d["sentences"])
    elif attention and "attention" in d:
        text += "\t" + _pairs(d["attention"])
    if hops and "hops" in d:
        text += "".join("\t" + _pairs(h) for h in d["hops"])
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

    @property
    def reads_documents(self) -> bool:
        return getattr(self.cfg.data, "format", "lines") == "documents"

    @property
    def hierarchical(self) -> bool:
        return bool(getattr(self.cfg.model, "hierarchical", False))

    def read(self, path: str) -> list:
        """Labelled sentences, or documents (``data.format: documents``)."""
        d = self.cfg.data
        if self.reads_documents:
            docs = read_documents(path, d.label_from, d.max_sentences)
            if d.lowercase:
                docs = [doc._replace(sentences=[[w.lower() for w in s] for s in doc.sentences]) for doc in docs]
            return docs
        items = read_labeled(path)
        if d.lowercase:
            items = [s._replace(tokens=[w.lower() for w in s.tokens]) for s in items]
        return items

    def encode_item(self, item: Any) -> tuple:
        """A labelled sentence or a document as the model reads it: a document's sentences
        apart for the hierarchical network, its words in one sequence otherwise."""
        if self.hierarchical:
            return self.encode_document(item.sentences), self.label_id(item.label)
        return self.encode(item.tokens, item.label)

    def label_id(self, label: str | None) -> int:
        """-1 for a label the training data never showed; 0 where there is none (prediction)."""
        return self.label_index.get(label, -1) if label is not None else 0

    def encode_document(self, sentences: list[list[str]]) -> list[list[int]]:
        if self.cfg.data.lowercase:
            sentences = [[w.lower() for w in s] for s in sentences]
        return [self.words.encode(s) for s in sentences]

    def encode(self, tokens: list[str], label: str | None = None) -> tuple:
        """Word ids and the label's id (-1 for a label the training data never showed)."""
        if self.cfg.data.lowercase:
            tokens = [w.lower() for w in tokens]
        return (self.words.encode(tokens), self.label_id(label), *self.lm_inputs(tokens))

    def score(self, sentences: list, batch_size: int) -> dict[str, Any]:
        """Loss, accuracy, macro-F1 and confusion matrix; a label the training data never
        showed is a class of its own (``<unseen>``) that no prediction matches."""
        items = [self.encode_item(s) for s in sentences]
        probs, _, loss = self.predict_encoded(items, batch_size)
        labels = list(self.labels)
        if any(x[1] < 0 for x in items):
            labels.append("<unseen>")
        gold = [x[1] if x[1] >= 0 else len(self.labels) for x in items]
        return {"loss": loss, **classification_scores(gold, probs.argmax(-1).tolist(), labels)}

    def evaluate_file(self, path: str, batch_size: int) -> dict[str, Any]:
        sentences = self.read(path)
        return {**self.score(sentences, batch_size), "labels": self.labels,
                ("documents" if self.reads_documents else "sentences"): len(sentences)}

    def predict_details(self, lines: list[str], batch_size: int) -> list[dict[str, Any] | None]:
        """Per line (of whitespace-separated words; for a document classifier, a JSON Lines
        document): the label, its probability, every label's, and with attention each word's
        weight (``attention``: the mean over hops, ``hops``: each hop's; documents read by the
        hierarchical network: ``sentences``, each sentence's weight and its words' within it,
        and ``attention``, each word's share of the document: its weight times its
        sentence's); None for an empty line."""
        docs: list[Document | None] = [None] * len(lines)
        if self.reads_documents:
            docs = [parse_document(line, f"line {n}", labelled=False) if line.strip() else None
                    for n, line in enumerate(lines, start=1)]
            words = [[] if doc is None else doc.tokens for doc in docs]
            items = [((), 0) if doc is None else self.encode_item(doc) for doc in docs]
        else:
            words = [line.split() for line in lines]
            items = [self.encode(w) for w in words]
        todo = [i for i, x in enumerate(items) if x[0]]
        p, weights, _ = self.predict_encoded([items[i] for i in todo], batch_size)
        out: list[dict[str, Any] | None] = [None] * len(lines)
        for row, i in enumerate(todo):
            best = int(p[row].argmax())
            out[i] = {"label": self.labels[best], "probability": float(p[row, best]),
                      "probabilities": {label: float(q) for label, q in zip(self.labels, p[row])}}
            w = weights[row]
            if w is None:
                continue
            if isinstance(w, tuple):              # hierarchical: sentences, then words within them
                sentences = docs[i].sentences
                out[i]["sentences"] = [{"weight": s, "words": list(zip(sent, within))}
                                       for s, sent, within in zip(w[0], sentences, w[1])]
                out[i]["attention"] = [(word, s * a) for s, sent, within in zip(w[0], sentences, w[1])
                                       for word, a in zip(sent, within)]
            elif w and isinstance(w[0], list):     # hops
                out[i]["attention"] = list(zip(words[i], [sum(col) / len(w) for col in zip(*w)]))
                out[i]["hops"] = [list(zip(words[i], hop)) for hop in w]
            else:
                out[i]["attention"] = list(zip(words[i], w))
        return out

    def predict(self, lines: list[str], batch_size: int, probs: bool = False,
                attention: bool = False) -> list[str]:
        """One label per line (with ``probs`` its probability, with ``attention`` each word's weight)."""
        return [format_prediction(d, probs, attention) for d in self.predict_details(lines, batch_size)]
