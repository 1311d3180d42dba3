"""What the tagging and classification tasks share: vocabularies built from the training
split, length-bucketed batches, word dropout, and batched prediction over raw lines."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from rnnkit.config import Config
from rnnkit.data.parallel import length_batches
from rnnkit.data.vocab import PAD, UNK, Vocab
from rnnkit.training.interface import StepResult

SPECIALS = [PAD, UNK]    # padding is id 0, unknown id 1


def word_vocab(sentences: Iterable[Sequence[str]], min_freq: int, max_size: int | None) -> Vocab:
    return Vocab.build((w for s in sentences for w in s), list(SPECIALS), min_freq, max_size)


def label_list(labels: Iterable[str]) -> list[str]:
    """The label set in first-seen order."""
    return list(dict.fromkeys(labels))


def drop_words(words: torch.Tensor, p: float) -> torch.Tensor:
    """Word dropout: each real word becomes <unk> with probability ``p`` (training only), so
    the model learns what to do with words it has never seen."""
    if p <= 0:
        return words
    drop = (torch.rand(words.shape, device=words.device) < p) & (words != 0)
    return words.masked_fill(drop, 1)


class LabelingTask:
    """Batches of encoded sentences; subclasses give ``encode``, ``collate``, ``loss``,
    ``predict_batch`` and ``score``."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device

    def train_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        return length_batches([len(x[0]) for x in self.train_set], self.cfg.train.batch_size, None, g)

    def train_step(self, indices: list[int], index: int, step: int) -> StepResult:
        batch = self.collate([self.train_set[i] for i in indices])
        return StepResult(self.loss(batch, training=True), self.units(batch, indices))

    def units(self, batch: dict[str, torch.Tensor], indices: list[int]) -> int:
        """What throughput counts: words (classifiers override: sentences)."""
        return sum(len(self.train_set[i][0]) for i in indices)

    def train_state(self) -> dict[str, Any]:
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        pass

    def batches_in_order(self, items: list, batch_size: int):
        """Batches of similar length; yields (positions in ``items``, collated batch)."""
        for indices in length_batches([len(x[0]) for x in items], batch_size, None):
            yield indices, self.collate([items[i] for i in indices])
