"""Sentence and document classification (e.g. sentiment, genre): a bidirectional RNN encoder
pooled into one vector per sentence (attention pooling with one hop or several), or Yang et
al.'s hierarchical network over a document's sentences, then a label."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rnnkit.config import (Config, recurrent_options)
from rnnkit.config.labeling import ClassificationDataConfig as DataConfig  # noqa: F401  (this task's sections)
from rnnkit.config.labeling import ClassificationModelConfig as ModelConfig  # noqa: F401
from rnnkit.data.parallel import pad
from rnnkit.models.rnn import length_mask
from rnnkit.models.labeling import HierarchicalClassifier, SentenceClassifier, hop_penalty
from rnnkit.data.vocab import Vocab
from rnnkit.tasks.classifier_text import ClassifierText
from rnnkit.tasks.labeling import LabelingTask, drop_words, label_list, word_vocab
from rnnkit.transfer import build_lm_features, initialise_encoder

class ClassificationTask(ClassifierText, LabelingTask):
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
        if m.hierarchical:
            self.model = HierarchicalClassifier(len(self.words), len(self.labels), m.embedding_dim, m.cell,
                                                m.hidden_size, m.num_layers, m.dropout, recurrent_options(m)).to(device)
        else:
            self.model = SentenceClassifier(len(self.words), len(self.labels), m.embedding_dim, m.cell,
                                            m.hidden_size, m.num_layers, m.dropout, m.pooling, recurrent_options(m),
                                            build_lm_features(m, extras, training=with_data), m.attention_hops).to(device)
        if extras is None and with_data:
            for note in initialise_encoder(m, self.model.embedding, self.words.itos, self.model.encoder.rnn):
                tqdm.write(note)
        self.model.embedding.weight.requires_grad_(not m.freeze_embeddings)
        if with_data:
            self.train_set = [self.encode_item(s) for s in train]
            self.valid = self.read(d.valid)

    def extras(self) -> dict[str, Any]:
        lm = {"lm_features": self.model.lm.specs} if self.model.lm is not None else {}
        return {"words": self.words.itos, "labels": self.labels, **lm}

    def lm_inputs(self, tokens: list[str]) -> tuple:
        return (self.model.lm.encode(tokens),) if self.model.lm is not None else ()

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        """Sentences padded to the longest; documents (hierarchical) padded at both levels:
        words (B, S, L), words per sentence (B, S), sentences per document (B,)."""
        if self.cfg.model.hierarchical:
            docs = [x[0] for x in items]
            flat, flat_counts = pad([sent for d in docs for sent in d])        # every sentence, padded once
            lengths = torch.as_tensor([len(d) for d in docs])
            real = length_mask(lengths, int(lengths.max()))
            words = flat.new_zeros(*real.shape, flat.size(1))
            counts = flat_counts.new_zeros(real.shape)
            words[real], counts[real] = flat, flat_counts
            tensors = {"words": words, "word_counts": counts, "lengths": lengths}
        else:
            words, lengths = pad([x[0] for x in items])
            tensors = {"words": words, "lengths": lengths}
        tensors["labels"] = torch.as_tensor([x[1] for x in items])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        if self.model.lm is not None:
            batch["lm"] = self.model.lm.collate([x[2] for x in items], self.device)
        return batch

    def forward(self, batch: dict[str, torch.Tensor], words: torch.Tensor | None = None):
        """Label scores and attention weights (see the models) of a collated batch."""
        words = batch["words"] if words is None else words
        if self.cfg.model.hierarchical:
            return self.model(words, batch["word_counts"], batch["lengths"])
        return self.model(words, batch["lengths"], batch.get("lm"))

    def loss(self, batch: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        words = drop_words(batch["words"], self.cfg.model.word_dropout) if training else batch["words"]
        logits, weights = self.forward(batch, words)
        loss = F.cross_entropy(logits.float(), batch["labels"].clamp(min=0))
        penalty = self.cfg.train.attention_penalty
        if penalty and training:
            loss = loss + penalty * hop_penalty(weights)
        return loss

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
            logits, attn = self.forward(batch)
            probs[indices] = torch.softmax(logits.float(), -1).cpu()
            known = batch["labels"] >= 0
            if bool(known.any()):
                total += F.cross_entropy(logits[known].float(), batch["labels"][known], reduction="sum").item()
                counted += int(known.sum())
            if isinstance(attn, tuple):           # documents: each sentence's weight, each word's within it
                sentence_weights, within = attn[0].cpu(), attn[1].cpu()
                for row, i in enumerate(indices):
                    doc = items[i][0]
                    weights[i] = (sentence_weights[row, :len(doc)].tolist(),
                                  [within[row, j, :len(sent)].tolist() for j, sent in enumerate(doc)])
            elif attn is not None:                # (B, L), or (B, hops, L)
                for row, i in enumerate(indices):
                    weights[i] = attn[row, ..., : len(items[i][0])].cpu().tolist()
        self.model.train(was_training)
        return probs, weights, total / max(1, counted)

    def evaluate(self) -> dict[str, float]:
        results = self.score(self.valid, self.cfg.train.eval_batch_size)
        results.pop("confusion")
        return results


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> ClassificationTask:
    return ClassificationTask(cfg, device, extras, with_data)
