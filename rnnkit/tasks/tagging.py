"""Sequence labeling: a tag for every word (part of speech, named entities) with a
bidirectional RNN, an optional character-level word encoder and a softmax or CRF output."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm import tqdm

from rnnkit.config import (Config, recurrent_options)
from rnnkit.config.labeling import TaggingDataConfig as DataConfig  # noqa: F401  (this task's sections)
from rnnkit.config.labeling import TaggingModelConfig as ModelConfig  # noqa: F401
from rnnkit.data.parallel import pad
from rnnkit.data.vocab import PAD, UNK, Vocab
from rnnkit.models.labeling import Tagger
from rnnkit.spans import is_span_scheme
from rnnkit.tasks.tagger_text import TaggerText
from rnnkit.tasks.labeling import LabelingTask, drop_words, label_list, word_vocab
from rnnkit.transfer import build_lm_features, initialise_encoder

Encoded = tuple[list[int], list[list[int]], list[int]]   # word ids, character ids per word, tag ids


class TaggingTask(TaggerText, LabelingTask):
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        super().__init__(cfg, device)
        d, m = cfg.data, cfg.model
        train = self.read(d.train, d.train_range, "data.train_range") if with_data else []
        if extras is None:
            self.words = word_vocab((self.word_forms(s.tokens) for s in train), d.min_freq, d.max_vocab)
            self.chars = Vocab([PAD, UNK] + label_list(c for s in train for w in s.tokens for c in w))
            self.tags = label_list(t for s in train for t in s.tags)
        else:
            self.words, self.chars, self.tags = Vocab(extras["words"]), Vocab(extras["chars"]), list(extras["tags"])
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.spans = is_span_scheme(self.tags)
        chars = (len(self.chars), m.char_embedding_dim, m.char_hidden_size) if m.char_encoder else None
        self.model = Tagger(len(self.words), len(self.tags), m.embedding_dim, m.cell, m.hidden_size, m.num_layers,
                            m.dropout, chars, m.output == "crf", recurrent_options(m),
                            build_lm_features(m, extras, training=with_data)).to(device)
        if extras is None and with_data:
            for note in initialise_encoder(m, self.model.embedding, self.words.itos, self.model.encoder.rnn):
                tqdm.write(note)
        self.model.embedding.weight.requires_grad_(not m.freeze_embeddings)
        if with_data:
            self.train_set = [self.encode(s.tokens, s.tags) for s in train]
            self.valid = self.read(d.valid, d.valid_range, "data.valid_range")

    def extras(self) -> dict[str, Any]:
        lm = {"lm_features": self.model.lm.specs} if self.model.lm is not None else {}
        return {"words": self.words.itos, "chars": self.chars.itos, "tags": self.tags, **lm}

    def lm_inputs(self, tokens: Sequence[str]) -> tuple:
        return (self.model.lm.encode(tokens),) if self.model.lm is not None else ()

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        words, lengths = pad([x[0] for x in items])
        width = max(len(c) for x in items for c in x[1])
        chars = torch.zeros(len(items), words.size(1), width, dtype=torch.long)
        tags = torch.zeros_like(words)
        for i, (_, cs, ts, *_) in enumerate(items):
            for j, c in enumerate(cs):
                chars[i, j, : len(c)] = torch.as_tensor(c)
            tags[i, : len(ts)] = torch.as_tensor(ts)
        batch = {"words": words, "lengths": lengths, "chars": chars, "tags": tags}
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.model.lm is not None:
            batch["lm"] = self.model.lm.collate([x[3] for x in items], self.device)
        return batch

    def scores(self, batch: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        words = drop_words(batch["words"], self.cfg.model.word_dropout) if training else batch["words"]
        return self.model(words, batch["lengths"], batch["chars"], batch.get("lm"))

    def loss(self, batch: dict[str, torch.Tensor], training: bool = False) -> torch.Tensor:
        return self.model.loss(self.scores(batch, training), batch["tags"].clamp(min=0), batch["lengths"])

    # ------------------------------------------------------------------ evaluation and inference
    @torch.no_grad()
    def predict_encoded(self, items: list[Encoded], batch_size: int) -> tuple[list[list[str]], float, int]:
        """Tags for encoded sentences, in order, and the loss over those whose tags are all known."""
        was_training = self.model.training
        self.model.eval()
        out: list[list[str]] = [[] for _ in items]
        total, counted = 0.0, 0
        for indices, batch in self.batches_in_order(items, batch_size):
            scores = self.scores(batch)
            for i, path in zip(indices, self.model.decode(scores, batch["lengths"])):
                out[i] = [self.tags[t] for t in path]
            known = [k for k, i in enumerate(indices) if min(items[i][2], default=0) >= 0]
            if known:
                sel = torch.as_tensor(known, device=self.device)
                n = int(batch["lengths"][sel].sum())
                total += self.model.loss(scores[sel], batch["tags"][sel], batch["lengths"][sel]).item() * n
                counted += n
        self.model.train(was_training)
        return out, total, counted

    def evaluate(self) -> dict[str, float]:
        results = self.score(self.valid, self.cfg.train.eval_batch_size)
        results.pop("per_type", None)
        if "f1" not in results:
            results["f1"] = results["accuracy"]    # one number to select on for any tag set
        return results


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> TaggingTask:
    return TaggingTask(cfg, device, extras, with_data)
