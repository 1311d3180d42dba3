"""Sentence classification (e.g. sentiment): a bidirectional RNN encoder pooled into one
vector per sentence, then a label."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rnnkit.config import (Config, recurrent_options)
from rnnkit.config.labeling import ClassificationDataConfig as DataConfig  # noqa: F401  (this task's sections)
from rnnkit.config.labeling import ClassificationModelConfig as ModelConfig  # noqa: F401
from rnnkit.data.labeled import read_labeled
from rnnkit.data.parallel import pad
from rnnkit.models.labeling import SentenceClassifier
from rnnkit.data.vocab import Vocab
from rnnkit.tasks.labeling import LabelingTask, drop_words, label_list, word_vocab
from rnnkit.transfer import build_lm_features, initialise_encoder

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


class ClassificationTask(LabelingTask):
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        super().__init__(cfg, device)
        d, m = cfg.data, cfg.model
        train = self.read(d.train) if with_data else []
        if extras is None:
            self.words = word_vocab((s.tokens for s in train), d.min_freq, d.max_vocab)
            self.labels = label_list(s.label for s in train)
        else:
            self.words, self.labels = Vocab(extras["words"]), list(extras["labels"])
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.model = SentenceClassifier(len(self.words), len(self.labels), m.embedding_dim, m.cell, m.hidden_size,
                                        m.num_layers, m.dropout, m.pooling, recurrent_options(m),
                                        build_lm_features(m, extras, training=with_data)).to(device)
        if extras is None and with_data:
            for note in initialise_encoder(m, self.model.embedding, self.words.itos, self.model.encoder.rnn):
                tqdm.write(note)
        self.model.embedding.weight.requires_grad_(not m.freeze_embeddings)
        if with_data:
            self.train_set = [self.encode(s.tokens, s.label) for s in train]
            self.valid = self.read(d.valid)

    def read(self, path: str) -> list:
        items = read_labeled(path)
        if self.cfg.data.lowercase:
            items = [s._replace(tokens=[w.lower() for w in s.tokens]) for s in items]
        return items

    def extras(self) -> dict[str, Any]:
        lm = {"lm_features": self.model.lm.specs} if self.model.lm is not None else {}
        return {"words": self.words.itos, "labels": self.labels, **lm}

    def encode(self, tokens: list[str], label: str | None = None) -> tuple[list[int], int]:
        """Word ids and the label's id (-1 for a label the training data never showed)."""
        if self.cfg.data.lowercase:
            tokens = [w.lower() for w in tokens]
        lm = (self.model.lm.encode(tokens),) if self.model.lm is not None else ()
        return (self.words.encode(tokens), self.label_index.get(label, -1) if label is not None else 0, *lm)

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        words, lengths = pad([x[0] for x in items])
        labels = torch.as_tensor([x[1] for x in items])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in
                 {"words": words, "lengths": lengths, "labels": labels}.items()}
        if self.model.lm is not None:
            batch["lm"] = self.model.lm.collate([x[2] for x in items], self.device)
        return batch

    def loss(self, batch: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        words = drop_words(batch["words"], self.cfg.model.word_dropout) if training else batch["words"]
        logits, _ = self.model(words, batch["lengths"], batch.get("lm"))
        return F.cross_entropy(logits.float(), batch["labels"].clamp(min=0))

    def units(self, batch: dict[str, torch.Tensor], indices: list[int]) -> int:
        return len(indices)   # throughput in sentences

    # ------------------------------------------------------------------ evaluation and inference
    @torch.no_grad()
    def predict_encoded(self, items: list, batch_size: int):
        """Probabilities (N, C), attention weights per sentence (or None), and the loss over
        sentences with known labels."""
        was_training = self.model.training
        self.model.eval()
        probs = torch.zeros(len(items), len(self.labels))
        weights: list = [None] * len(items)
        total, counted = 0.0, 0
        for indices, batch in self.batches_in_order(items, batch_size):
            logits, attn = self.model(batch["words"], batch["lengths"], batch.get("lm"))
            probs[indices] = torch.softmax(logits.float(), -1).cpu()
            known = batch["labels"] >= 0
            if bool(known.any()):
                total += F.cross_entropy(logits[known].float(), batch["labels"][known], reduction="sum").item()
                counted += int(known.sum())
            if attn is not None:
                for row, i in enumerate(indices):
                    weights[i] = attn[row, : len(items[i][0])].cpu().tolist()
        self.model.train(was_training)
        return probs, weights, total / max(1, counted)

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

    def evaluate(self) -> dict[str, float]:
        results = self.score(self.valid, self.cfg.train.eval_batch_size)
        results.pop("confusion")
        return results

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


def format_prediction(d: dict[str, Any] | None, probs: bool = False, attention: bool = False) -> str:
    """A :meth:`ClassificationTask.predict_details` entry as ``predict`` prints it."""
    if d is None:
        return ""
    text = d["label"] + (f"\t{d['probability']:.4f}" if probs else "")
    if attention and "attention" in d:
        text += "\t" + " ".join(f"{w}:{a:.3f}" for w, a in d["attention"])
    return text


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> ClassificationTask:
    return ClassificationTask(cfg, device, extras, with_data)
