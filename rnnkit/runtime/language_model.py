"""A language model's step graph on onnxruntime: scoring, sampling and incremental feeding
through :mod:`rnnkit.decoding.lm_loop`, the same code the torch task runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.config import ConfigError
from rnnkit.data.vocab import Vocab, make_tokenizer
from rnnkit.decoding.lm_loop import stream_nll
from rnnkit.runtime.base import Exported
from rnnkit.runtime.manifest import open_graph
from rnnkit.tasks.lm_text import LanguageModelText


class OnnxLanguageModel(LanguageModelText, Exported):
    def __init__(self, folder: Path, manifest: dict[str, Any]):
        super().__init__(folder, manifest)
        self.vocab = Vocab(manifest["extras"]["vocab"])
        self.tokenizer = make_tokenizer(self.cfg.data.tokenizer)
        graph = manifest["graphs"]["step"]
        self.session = open_graph(folder, graph)
        self.state_names = graph["inputs"][1:]           # h (and c for an LSTM)
        self.state_shape = graph["state_shape"]          # (layers, hidden): the batch goes in between

    def step_states(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        if state is None:
            layers, hidden = self.state_shape
            state = [np.zeros((layers, ids.shape[0], hidden), np.float32) for _ in self.state_names]
        feeds = {"tokens": ids.astype(np.int64), **dict(zip(self.state_names, state))}
        log_probs, top, *state = self.session.run(None, feeds)
        return log_probs, top, state

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        log_probs, _, state = self.step_states(ids, state)
        return log_probs, state

    def evaluate_text(self, text: str, rows: int = 16, cache: int = 0, theta: float = 0.3,
                      lam: float = 0.1) -> dict[str, float]:
        """Loss and perplexity of ``text`` cut into ``rows`` streams, as the torch task scores it;
        with ``cache`` also with the continuous cache (``cache_*`` entries)."""
        ids = np.asarray(self.encode(text), np.int64)
        rows = max(1, min(rows, len(ids) // (2 * self.cfg.data.bptt)))
        length = len(ids) // rows
        if length < 2:
            raise ConfigError("", f"{len(ids)} tokens are too few to score")
        stream = ids[: rows * length].reshape(rows, length)
        if not cache:
            total, tokens = stream_nll(self, stream, self.cfg.data.bptt)
            return {**self.metrics(total / tokens, tokens), "tokens": tokens}
        loss, with_cache, tokens = self.cache_loss(stream, cache, theta, lam)
        return {**self.metrics(loss, tokens), **{f"cache_{k}": v for k, v in self.metrics(with_cache, tokens).items()},
                "tokens": tokens}
