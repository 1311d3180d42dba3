"""Character- and word-level language modeling with truncated backpropagation through time."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rnnkit.config import (MAX_DIM, MAX_LAYERS, MAX_VOCAB, Config, ConfigError, RecurrentConfig, check_recurrent, num,
                           recurrent_options, require_file)
from rnnkit.data.builders import char_cuts, prepare_stream
from rnnkit.data.prepare import ensure_store
from rnnkit.data.store import Store, StoreWriter
from rnnkit.data.vocab import EOS, DataError, Vocab, make_tokenizer
from rnnkit.decoding.sampling import sample_next
from rnnkit.gradient_flow import GradientFlow, measure
from rnnkit.metrics import perplexity
from rnnkit.models.language_model import RNNLanguageModel
from rnnkit.models.rnn import detach_state
from rnnkit.training import distributed
from rnnkit.training.trainer import StepResult

METRICS = ("valid_loss", "valid_ppl", "valid_bpc")


@dataclass
class DataConfig:
    path: Optional[str] = None          # one text file, cut into train/valid/test by ``split``
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # fractions of characters
    train: Optional[str] = None         # or: separate files (``path`` unset)
    valid: Optional[str] = None
    test: Optional[str] = None
    tokenizer: Literal["char", "word"] = "char"
    min_freq: int = num(1, 1)
    max_vocab: Optional[int] = num(None, 2, MAX_VOCAB)
    bptt: int = num(64, 1)               # tokens per truncated-BPTT window
    cache: bool = True                   # keep the prepared store in the data cache (false: per run)


@dataclass
class ModelConfig(RecurrentConfig):
    embedding_dim: int = num(128, 1, MAX_DIM)
    hidden_size: int = num(256, 1, MAX_DIM)
    num_layers: int = num(2, 1, MAX_LAYERS)
    dropout: float = num(0.0, 0, 1, hi_open=True)
    tie_weights: bool = False


def check_config(cfg: Config) -> None:
    d = cfg.data
    check_recurrent(cfg.model, "model")
    if cfg.train.metric not in METRICS:
        raise ConfigError("train.metric",
                          f"expected one of {', '.join(METRICS)} for task 'lm', got {cfg.train.metric!r}")
    if d.path is not None and d.train is not None:
        raise ConfigError("data.train", "set either data.path (one file, split) or data.train/valid/test, not both")
    if d.path is None:
        require_file("data.train", d.train)
        require_file("data.valid", d.valid)
        if d.test is not None:
            require_file("data.test", d.test)
        return
    require_file("data.path", d.path)
    if len(d.split) != 3 or any(f < 0 for f in d.split) or d.split[0] <= 0 or d.split[1] <= 0 \
            or sum(d.split) > 1 + 1e-9:
        raise ConfigError("data.split", f"expected three fractions [train, valid, test], train and valid > 0, "
                                        f"summing to at most 1, got {d.split!r}")


def batchify(ids: np.ndarray, rows: int) -> np.ndarray:
    """Lay a token stream out as ``rows`` contiguous streams: a (rows, length) view."""
    length = len(ids) // rows
    if length < 2:
        raise DataError(f"{len(ids)} tokens are too few to lay out as {rows} streams; "
                        f"give more text or a smaller batch size")
    return ids[: rows * length].reshape(rows, length)


def prepare_data(cfg: Config, extras: dict[str, Any] | None = None, workers: int | None = None) -> Store:
    """The config's text as a prepared store of token streams (train, valid, test), with the
    vocabulary fitted on train, or a resumed run's (``extras``)."""
    d = cfg.data
    sources = [d.path] if d.path is not None else [p for p in (d.train, d.valid, d.test) if p]
    settings = {"tokenizer": d.tokenizer, "min_freq": d.min_freq, "max_vocab": d.max_vocab,
                "split": d.split if d.path is not None else None}
    given = None if extras is None else list(extras["vocab"])

    def build(writer: StoreWriter, n: int) -> dict[str, Any]:
        if d.path is not None:
            a, b, c = char_cuts(d.path, d.split)
            splits = {"train": (d.path, 0, a), "valid": (d.path, a, b), "test": (d.path, b, c)}
        else:
            splits = {name: (path, 0, None) for name, path in (("train", d.train), ("valid", d.valid),
                                                               ("test", d.test)) if path}
        spec = ("fixed", given) if given is not None else ("fit", d.min_freq, d.max_vocab)
        return prepare_stream(writer, n, splits, d.tokenizer, spec)

    return ensure_store("lm", sources, settings, build, workers, d.cache, given,
                        lambda store: store.tokenizer_state("vocab")["vocab"])


class LanguageModelTask:
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        self.cfg, self.device = cfg, device
        self.tokenizer = make_tokenizer(cfg.data.tokenizer)
        store = prepare_data(cfg, extras) if with_data else None
        self.vocab = Vocab(extras["vocab"] if extras is not None else store.tokenizer_state("vocab")["vocab"])
        m = cfg.model
        self.model = RNNLanguageModel(len(self.vocab), m.cell, m.embedding_dim, m.hidden_size,
                                      m.num_layers, m.dropout, m.tie_weights, recurrent_options(m)).to(device)
        self.state = None
        self.train_stream: np.ndarray | None = None     # (rows, length), mapped from the store
        self.valid_stream: torch.Tensor | None = None
        if store is not None:
            self.train_stream = batchify(store.stream("train"), cfg.train.batch_size)
            valid = np.array(store.stream("valid"), dtype=np.int64)
            rows = min(cfg.train.eval_batch_size, max(1, len(valid) // (2 * cfg.data.bptt)))
            self.valid_stream = torch.from_numpy(np.ascontiguousarray(batchify(valid, rows))).to(device)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(self.tokenizer.split(text))

    # ------------------------------------------------------------------ training interface
    def train_batches(self, epoch: int) -> range:
        """Window start offsets over the batchified training stream."""
        return range(0, self.train_stream.shape[1] - 1, self.cfg.data.bptt)

    def shard(self, start: int, rank: distributed.Rank) -> tuple[int, int, int] | list:
        """Under torchrun each rank reads its own block of the batch's streams (rows)."""
        lo, hi = distributed.share(self.train_stream.shape[0], rank)
        return (start, lo, hi) if hi > lo else []

    def train_step(self, batch: int | tuple[int, int, int], index: int, step: int) -> StepResult:
        start, lo, hi = batch if isinstance(batch, tuple) else (batch, 0, self.train_stream.shape[0])
        if index == 0:
            self.state = None   # a new pass over the stream starts from a zero state
        if self.state is not None and _rows(self.state) != hi - lo:   # all streams' state, from a checkpoint
            self.state = tuple(s[:, lo:hi] for s in self.state) if isinstance(self.state, tuple) \
                else self.state[:, lo:hi]
        x, y = self._window(self.train_stream[lo:hi], start)
        logits, state = self.model(x, self.state)
        self.state = detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        return StepResult(loss, y.numel())

    def train_state(self) -> dict[str, Any]:
        """The carried hidden state of every stream (gathered from all ranks under torchrun)."""
        s = self.state
        if s is None:
            return {"hidden": None}
        parts = list(s) if isinstance(s, tuple) else [s]
        rank = distributed.current()
        if rank.world > 1:
            parts = [distributed.gather_rows(p, 1, rank) for p in parts]
        return {"hidden": parts}

    def load_train_state(self, state: dict[str, Any]) -> None:
        h = state.get("hidden")
        self.state = None if h is None else (tuple(h) if len(h) == 2 else h[0])

    def extras(self) -> dict[str, Any]:
        return {"vocab": self.vocab.itos, "tokenizer": self.cfg.data.tokenizer}

    def _window(self, stream: torch.Tensor | np.ndarray, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of the bptt window at ``start`` (the last may be shorter);
        a mapped stream's window is read into a tensor on the device."""
        if isinstance(stream, np.ndarray):
            window = stream[:, start:start + 1 + self.cfg.data.bptt].astype(np.int64)
            stream, start = torch.from_numpy(window).to(self.device), 0
        y = stream[:, start + 1:start + 1 + self.cfg.data.bptt]
        return stream[:, start:start + y.size(1)], y

    @torch.no_grad()
    def stream_loss(self, stream: torch.Tensor, progress: bool = False) -> tuple[float, int]:
        """Mean loss per token over a batchified stream, carrying state across windows (with
        ``progress``, a bar on stderr when it is a terminal)."""
        total, count, state = 0.0, 0, None
        starts = range(0, stream.size(1) - 1, self.cfg.data.bptt)
        for start in tqdm(starts, desc="eval", unit="window", file=sys.stderr, leave=False,
                          disable=None if progress and len(starts) > 20 else True):
            x, y = self._window(stream, start)
            logits, state = self.model(x, state)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
        return total / count, count

    def metrics(self, loss: float, tokens: int) -> dict[str, float]:
        out = {"loss": loss, "ppl": perplexity(loss)}
        if self.cfg.data.tokenizer == "char":
            out["bpc"] = loss / math.log(2)
        return out

    def evaluate(self) -> dict[str, float]:
        loss, tokens = self.stream_loss(self.valid_stream)
        return self.metrics(loss, tokens)

    def gradient_flow(self) -> GradientFlow:
        """dL/dh_t for the loss of a validation window's last prediction, from a zero state."""
        x, y = self._window(self.valid_stream, 0)

        def last_loss() -> torch.Tensor:
            logits, _ = self.model(x)
            return F.cross_entropy(logits[:, -1].float(), y[:, -1])

        return measure(self.model, "rnn", last_loss, x.size(1) - 1)

    # ------------------------------------------------------------------ inference
    def evaluate_text(self, text: str, rows: int = 16) -> dict[str, float]:
        ids = self.encode(text)
        rows = max(1, min(rows, len(ids) // (2 * self.cfg.data.bptt)))
        self.model.eval()
        stream = torch.from_numpy(np.ascontiguousarray(batchify(np.asarray(ids, np.int64), rows))).to(self.device)
        loss, tokens = self.stream_loss(stream, progress=True)
        return {**self.metrics(loss, tokens), "tokens": tokens}

    @torch.no_grad()
    def generate(self, prime: str, length: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield ``length`` sampled tokens (as text pieces) after feeding ``prime``."""
        self.model.eval()
        ids = self.encode(prime) if prime else []
        if not ids:  # start from a line break (or the first ordinary token)
            start = "\n" if self.cfg.data.tokenizer == "char" else EOS
            ids = [self.vocab.stoi.get(start, len(self.vocab) - 1)]
        logits, state = self.model(torch.tensor([ids], device=self.device))
        last = logits[:, -1]
        word = self.cfg.data.tokenizer == "word"
        for _ in range(length):
            last[:, self.vocab.unk] = float("-inf")   # never emit <unk>
            nxt = sample_next(last, temperature, top_k, top_p, generator)
            tok = self.vocab.itos[int(nxt)]
            yield ("\n" if tok == EOS else tok + " ") if word else tok
            logits, state = self.model(nxt.view(1, 1), state)
            last = logits[:, -1]


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> LanguageModelTask:
    """A task for training (``with_data``) or, from a checkpoint's ``extras``, for inference."""
    return LanguageModelTask(cfg, device, extras, with_data)


def _rows(state) -> int:
    return (state[0] if isinstance(state, tuple) else state).size(1)
