"""A translation model's encoder and decoder-step graphs on onnxruntime. Tokenizing, beam
search, ``--replace-unk`` and continuous batching come from
:mod:`rnnkit.tasks.translation_text`, the same code the torch task runs; this module is
its backend: run a step, reorder the state's rows, join and narrow states."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.data.tokenizers import tokenizer_from_state
from rnnkit.data.vocab import BOS, EOS
from rnnkit.runtime.base import Exported
from rnnkit.runtime.classifier import pad
from rnnkit.runtime.manifest import open_graph
from rnnkit.tasks.translation_text import TranslationText

SOURCE_WISE = ("memory", "keys", "mask")      # arrays with a source axis (axis 1)


class OnnxSteps:
    """:class:`rnnkit.decoding.search.Backend` of the decoder-step graph; a state is a dict of
    arrays named as the graph's inputs."""

    def __init__(self, session: Any, spec: dict[str, Any], vocab_size: int):
        self.session, self.vocab_size = session, vocab_size
        self.axes: dict[str, int] = spec["state"]
        self.returns: list[str] = spec["returns"]
        self.attention = "weights" in spec["outputs"]

    def run(self, tokens: np.ndarray, state: dict[str, np.ndarray], k: int, gold: np.ndarray | None = None):
        feeds = {"tokens": np.ascontiguousarray(tokens, np.int64), "k": np.zeros(min(k, self.vocab_size), np.float32),
                 "gold": np.zeros(tokens.size, np.int64) if gold is None else np.ascontiguousarray(gold, np.int64),
                 **state}
        out = self.session.run(None, feeds)
        values, ids, gold_logp = out[:3]
        weights = out[3] if self.attention else None
        new = dict(state)
        new.update(zip(self.returns, out[4 if self.attention else 3:]))
        return values, ids, gold_logp, weights, new

    def step(self, tokens: np.ndarray, state: dict[str, np.ndarray], k: int):
        values, ids, _, weights, new = self.run(tokens, state, k)
        return values.astype(np.float64), ids, weights, new

    def select(self, state: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(a.take(index, axis=self.axes[n])) for n, a in state.items()}

    def join(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        width = max((s[n].shape[1] for s in (a, b) for n in SOURCE_WISE if n in s), default=0)
        out = {}
        for n in a:
            x, y = a[n], b[n]
            if n in SOURCE_WISE:
                x, y = _pad_source(x, width), _pad_source(y, width)
            out[n] = np.concatenate([x, y], axis=self.axes[n])
        return out

    @staticmethod
    def narrow_source(state: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
        if "mask" not in state or width >= state["mask"].shape[1]:
            return state
        return {n: (np.ascontiguousarray(a[:, :width]) if n in SOURCE_WISE else a) for n, a in state.items()}


def _pad_source(x: np.ndarray, width: int) -> np.ndarray:
    extra = width - x.shape[1]
    return x if not extra else np.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


class OnnxTranslator(TranslationText, Exported):
    def __init__(self, folder: Path, manifest: dict[str, Any]):
        super().__init__(folder, manifest)
        extras = manifest["extras"]
        self.src_tok, self.tgt_tok = tokenizer_from_state(extras["src"]), tokenizer_from_state(extras["tgt"])
        self.bos, self.eos = self.tgt_tok.vocab.stoi[BOS], self.tgt_tok.vocab.stoi[EOS]
        graphs = manifest["graphs"]
        self.encoder = open_graph(folder, graphs["encoder"])
        self.step_spec = graphs["step"]
        self.step_session = open_graph(folder, self.step_spec)
        self.encoder_outputs = graphs["encoder"]["outputs"]
        self.hidden = self.cfg.model.decoder.hidden_size

    def encode_ids(self, ids: list[list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        src, lengths = pad(ids)
        state = dict(zip(self.encoder_outputs, self.encoder.run(None, {"src": src, "lengths": lengths})))
        axes = self.step_spec["state"]
        if "feed" in axes:
            state["feed"] = np.zeros((len(ids), self.hidden), np.float32)
        if "mask" in axes:
            state["mask"] = np.arange(src.shape[1])[None, :] < lengths[:, None]
        return {n: state[n] for n in axes}, lengths

    def search_backend(self) -> OnnxSteps:
        return OnnxSteps(self.step_session, self.step_spec, len(self.tgt_tok.vocab))

    def inference(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def score_pairs(self, src: list[str], tgt: list[str], batch_size: int = 64) -> tuple[float, int]:
        """Teacher-forced loss per target token over raw sentence pairs: the step graph run on
        the gold prefix, reading the gold token's log-probability."""
        pairs = [(a, b) for a, b in ((self.src_tok.encode(s), self.tgt_tok.encode(t)) for s, t in zip(src, tgt)) if a]
        steps = self.search_backend()
        total, tokens = 0.0, 0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            state, _ = self.encode_ids([a for a, _ in chunk])
            gold, _ = pad([b + [self.eos] for _, b in chunk])         # y_1 .. y_n </s>, padded with 0
            prev = np.concatenate([np.full((len(chunk), 1), self.bos, np.int64), gold[:, :-1]], 1)
            for t in range(gold.shape[1]):
                _, _, logp, _, state = steps.run(prev[:, t], state, 1, gold[:, t])
                real = gold[:, t] != 0
                total -= float(logp[real].sum())
                tokens += int(real.sum())
        return total / max(1, tokens), tokens
