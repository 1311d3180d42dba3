"""A sentence classifier's graph on onnxruntime; reading, encoding and scoring come from
:mod:`rnnkit.tasks.classifier_text`, the same code the torch task runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.data.store import bucket_batches
from rnnkit.data.vocab import Vocab
from rnnkit.runtime.base import Exported
from rnnkit.runtime.manifest import open_graph
from rnnkit.tasks.classifier_text import ClassifierText


def padded_batches(lengths: list[int], batch_size: int):
    """Positions of sentences of similar length, ``batch_size`` at a time (the torch tasks' batching)."""
    for batch in bucket_batches(lengths, batch_size):
        yield batch.tolist()


def pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(r) for r in rows], np.int64)
    out = np.zeros((len(rows), int(lengths.max())), np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


class OnnxClassifier(ClassifierText, Exported):
    def __init__(self, folder: Path, manifest: dict[str, Any]):
        super().__init__(folder, manifest)
        self.words = Vocab(manifest["extras"]["words"])
        self.labels = list(manifest["extras"]["labels"])
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.graph = manifest["graphs"]["classify"]
        self.session = open_graph(folder, self.graph)

    def predict_encoded(self, items: list, batch_size: int):
        probs = np.zeros((len(items), len(self.labels)), np.float32)
        weights: list = [None] * len(items)
        total, counted = 0.0, 0
        for indices in padded_batches([len(x[0]) for x in items], batch_size):
            words, lengths = pad([items[i][0] for i in indices])
            out = self.session.run(None, {"words": words, "lengths": lengths})
            probs[indices] = out[0]
            for row, i in enumerate(indices):
                label = items[i][1]
                if label >= 0:
                    total -= float(np.log(max(float(out[0][row, label]), 1e-30)))
                    counted += 1
                if len(out) > 1:
                    weights[i] = out[1][row, ..., : len(items[i][0])].tolist()     # (L) or (hops, L)
        return probs, weights, total / max(1, counted)
