"""A tagger's graph on onnxruntime, its CRF (when it has one) decoded in numpy; reading,
encoding and scoring come from :mod:`rnnkit.tasks.tagger_text`, as for the torch task."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.data.vocab import Vocab
from rnnkit.runtime.classifier import pad, padded_batches
from rnnkit.runtime.base import Exported
from rnnkit.runtime.manifest import open_graph
from rnnkit.spans import is_span_scheme
from rnnkit.tasks.tagger_text import TaggerText, crf_nll, viterbi


class OnnxTagger(TaggerText, Exported):
    def __init__(self, folder: Path, manifest: dict[str, Any]):
        super().__init__(folder, manifest)
        extras = manifest["extras"]
        self.words, self.chars, self.tags = Vocab(extras["words"]), Vocab(extras["chars"]), list(extras["tags"])
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.spans = is_span_scheme(self.tags)
        self.graph = manifest["graphs"]["tag"]
        self.session = open_graph(folder, self.graph)
        crf = self.graph.get("crf")
        self.crf = None if crf is None else tuple(np.asarray(crf[k], np.float64) for k in ("transitions", "start",
                                                                                           "end"))

    def _chars(self, items: list, indices: list[int], width: int) -> np.ndarray:
        letters = max(1, max(len(c) for i in indices for c in items[i][1]))
        out = np.zeros((len(indices), width, letters), np.int64)
        for row, i in enumerate(indices):
            for j, c in enumerate(items[i][1]):
                out[row, j, : len(c)] = c
        return out

    def predict_encoded(self, items: list, batch_size: int) -> tuple[list[list[str]], float, int]:
        out: list[list[str]] = [[] for _ in items]
        total, counted = 0.0, 0
        for indices in padded_batches([len(x[0]) for x in items], batch_size):
            words, lengths = pad([items[i][0] for i in indices])
            feeds = {"words": words, "lengths": lengths}
            if "chars" in self.graph["inputs"]:
                feeds["chars"] = self._chars(items, indices, words.shape[1])
            scores = self.session.run(None, feeds)[0].astype(np.float64)
            for row, i in enumerate(indices):
                n, gold = int(lengths[row]), items[i][2]
                emissions = scores[row, :n]
                path = viterbi(emissions, n, *self.crf) if self.crf else emissions.argmax(-1).tolist()
                out[i] = [self.tags[t] for t in path]
                if min(gold, default=0) >= 0:
                    if self.crf:
                        total += crf_nll(emissions, gold, *self.crf)
                    else:
                        top = emissions.max(-1, keepdims=True)
                        log_z = (top + np.log(np.exp(emissions - top).sum(-1, keepdims=True)))[:, 0]
                        total += float((log_z - emissions[np.arange(n), gold]).sum())
                    counted += n
        return out, total, counted
