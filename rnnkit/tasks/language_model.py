"""Character- and word-level language modeling with truncated backpropagation through time."""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rnnkit.config import Config, ConfigError
from rnnkit.config.lm import DataConfig, ModelConfig  # noqa: F401  (this task's sections)
from rnnkit.data.builders import char_cuts, prepare_stream
from rnnkit.data.prepare import ensure_store
from rnnkit.data.store import Store, StoreWriter
from rnnkit.data.vocab import DataError, Vocab, make_tokenizer
from rnnkit.gradient_flow import GradientFlow, measure
from rnnkit.models.language_model import build_language_model
from rnnkit.models.rnn import detach_state
from rnnkit.training import distributed
from rnnkit.training.interface import StepResult
from rnnkit.tasks.lm_text import LanguageModelText
from rnnkit.transfer import read_language_model

def batchify(ids: np.ndarray, rows: int, source: str = "the text") -> np.ndarray:
    """Lay a token stream out as ``rows`` contiguous streams: a (rows, length) view; ``source``
    names the text in the error when it is too short."""
    length = len(ids) // rows
    if length < 2:
        if rows == 1:
            raise DataError(f"{source}: {len(ids)} tokens are too few (at least 2 are needed)")
        raise DataError(f"{source}: {len(ids)} tokens are too few to lay out as {rows} streams; "
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


class LanguageModelTask(LanguageModelText):
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        self.cfg, self.device = cfg, device
        self.tokenizer = make_tokenizer(cfg.data.tokenizer)
        pretrained = None
        if cfg.model.init_from is not None and extras is None:    # fine-tuning: the LM's vocabulary
            pretrained = read_language_model(cfg.model.init_from, "model.init_from", cfg.data.reverse,
                                             cfg.data.tokenizer)
            extras = {"vocab": pretrained["vocab"]}
        store = prepare_data(cfg, extras) if with_data else None
        self.vocab = Vocab(extras["vocab"] if extras is not None else store.tokenizer_state("vocab")["vocab"])
        m = cfg.model
        if m.output == "adaptive" and m.cutoffs[-1] >= len(self.vocab):
            raise ConfigError("model.cutoffs", f"the last cut-off ({m.cutoffs[-1]}) must be below the vocabulary "
                                               f"size ({len(self.vocab)})")
        self.model = build_language_model(m, len(self.vocab)).to(device)
        if pretrained is not None:
            try:
                self.model.load_state_dict(pretrained["model"])
            except RuntimeError as err:
                detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
                raise ConfigError("model.init_from", f"{m.init_from}'s model does not fit this config's model "
                                                     f"({detail}); use the same model settings") from None
        self.state = None
        self.train_stream: np.ndarray | None = None     # (rows, length), mapped from the store
        self.valid_stream: torch.Tensor | None = None
        if store is not None:
            d = cfg.data
            self.train_stream = batchify(self._directed(store.stream("train")), cfg.train.batch_size,
                                         f"data.train ({d.train})" if d.path is None else f"data.path ({d.path})")
            valid = np.array(self._directed(store.stream("valid")), dtype=np.int64)
            rows = min(cfg.train.eval_batch_size, max(1, len(valid) // (2 * cfg.data.bptt)))
            named = f"data.valid ({d.valid})" if d.path is None else "data.path's validation split"
            self.valid_stream = torch.from_numpy(np.ascontiguousarray(batchify(valid, rows, named))).to(device)

    def _directed(self, ids: np.ndarray) -> np.ndarray:
        """A stream as the model reads it: reversed (a view) for a backward LM."""
        return ids[::-1] if self.cfg.data.reverse else ids

    # ------------------------------------------------------------------ training interface
    def train_batches(self, epoch: int) -> list[tuple[int, int]]:
        """Windows (start, length) over the batchified training stream. With
        ``data.variable_bptt`` their lengths are drawn afresh each epoch, from the seed and the
        epoch alone (a resumed run sees the same windows)."""
        bptt, width = self.cfg.data.bptt, self.train_stream.shape[1] - 1
        if not self.cfg.data.variable_bptt:
            return [(s, min(bptt, width - s)) for s in range(0, width, bptt)]
        rng = np.random.default_rng([self.cfg.seed, epoch])
        windows, start = [], 0
        while start < width:
            base = bptt if rng.random() < 0.95 else bptt / 2
            length = min(max(5, int(rng.normal(base, 5))), width - start)
            windows.append((start, length))
            start += length
        return windows

    def shard(self, window: tuple[int, int], rank: distributed.Rank) -> tuple[int, int, int, int] | list:
        """Under torchrun each rank reads its own block of the batch's streams (rows)."""
        lo, hi = distributed.share(self.train_stream.shape[0], rank)
        return (*window, lo, hi) if hi > lo else []

    def train_step(self, batch: tuple[int, ...], index: int, step: int) -> StepResult:
        start, length, lo, hi = batch if len(batch) == 4 else (*batch, 0, self.train_stream.shape[0])
        if index == 0 or not self.cfg.data.carry_state:
            self.state = None   # a new pass over the stream (or every window) starts from a zero state
        if self.state is not None and _rows(self.state) != hi - lo:   # all streams' state, from a checkpoint
            self.state = tuple(s[:, lo:hi] for s in self.state) if isinstance(self.state, tuple) \
                else self.state[:, lo:hi]
        x, y = self._window(self.train_stream[lo:hi], start, length)
        f = self.model.features(x, self.state)
        self.state = detach_state(f.state)
        loss = self.model.loss(f.output, y)
        t, penalty = self.cfg.train, None
        if t.ar:    # activation regularisation, on the top layer's dropped-out output
            penalty = t.ar * f.dropped.float().pow(2).mean()
        if t.tar:   # temporal: on the difference of successive outputs, before dropout
            hidden = f.hidden.float()
            slow = t.tar * (hidden[:, 1:] - hidden[:, :-1]).pow(2).mean()
            penalty = slow if penalty is None else penalty + slow
        scale = length / self.cfg.data.bptt if self.cfg.data.variable_bptt else 1.0
        return StepResult(loss, y.numel(), penalty=penalty, lr_scale=scale)

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

    def _window(self, stream: torch.Tensor | np.ndarray, start: int,
                length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of the window of ``length`` (default ``data.bptt``;
        the last may be shorter) at ``start``; a mapped stream's window is read into a tensor
        on the device."""
        length = self.cfg.data.bptt if length is None else length
        if isinstance(stream, np.ndarray):
            window = stream[:, start:start + 1 + length].astype(np.int64)
            stream, start = torch.from_numpy(window).to(self.device), 0
        y = stream[:, start + 1:start + 1 + length]
        return stream[:, start:start + y.size(1)], y

    def _windows(self, stream: torch.Tensor, progress: bool):
        starts = range(0, stream.size(1) - 1, self.cfg.data.bptt)
        for start in tqdm(starts, desc="eval", unit="window", file=sys.stderr, leave=False,
                          disable=None if progress and len(starts) > 20 else True):
            yield self._window(stream, start)

    @torch.no_grad()
    def stream_loss(self, stream: torch.Tensor, progress: bool = False) -> tuple[float, int]:
        """Mean loss per token over a batchified stream, carrying state across windows (with
        ``progress``, a bar on stderr when it is a terminal)."""
        total, count, state = 0.0, 0, None
        for x, y in self._windows(stream, progress):
            out, _, _, state = self.model.features(x, state)
            total += self.model.loss(out, y, reduction="sum").item()
            count += y.numel()
        return total / count, count

    def evaluate(self) -> dict[str, float]:
        loss, tokens = self.stream_loss(self.valid_stream)
        return self.metrics(loss, tokens)

    def gradient_flow(self) -> GradientFlow:
        """dL/dh_t for the loss of a validation window's last prediction, from a zero state."""
        x, y = self._window(self.valid_stream, 0)

        def last_loss() -> torch.Tensor:   # (the adaptive softmax's scores are log-probabilities already)
            logits, _ = self.model(x)
            return F.cross_entropy(logits[:, -1].float(), y[:, -1])

        return measure(self.model, "rnn", last_loss, x.size(1) - 1)

    # ------------------------------------------------------------------ inference
    def evaluate_text(self, text: str, rows: int = 16, cache: int = 0, theta: float = 0.3,
                      lam: float = 0.1) -> dict[str, float]:
        """Loss and perplexity of ``text`` cut into ``rows`` streams; with ``cache`` (a word
        LM), also with a continuous cache of that many positions (``cache_*`` entries)."""
        ids = self.encode(text)
        rows = max(1, min(rows, len(ids) // (2 * self.cfg.data.bptt)))
        self.model.eval()
        stream = torch.from_numpy(np.ascontiguousarray(batchify(np.asarray(ids, np.int64), rows))).to(self.device)
        if not cache:
            loss, tokens = self.stream_loss(stream, progress=True)
            return {**self.metrics(loss, tokens), "tokens": tokens}
        loss, with_cache, tokens = self.cache_loss(stream.cpu().numpy(), cache, theta, lam, self._progress)
        return {**self.metrics(loss, tokens), **{f"cache_{k}": v for k, v in self.metrics(with_cache, tokens).items()},
                "tokens": tokens}

    def training_ids(self) -> np.ndarray:
        """The training text's token ids, read again from the config's files (dynamic
        evaluation's gradient statistics); one line when they are not there."""
        from pathlib import Path

        from rnnkit.data.vocab import read_text

        d = self.cfg.data
        path = d.path if d.path is not None else d.train
        if path is None or not Path(path).is_file():
            raise DataError(f"the gradient statistics need the training text, and {path} is not there; give the "
                            f"checkpoint's training file at that path, or use --dynamic-rule sgd, which needs none")
        if d.path is not None:
            end = char_cuts(d.path, d.split)[0]
            with open(d.path, "rb") as fh:
                text = fh.read(end).decode("utf-8", errors="replace")
        else:
            text = read_text(path)
        return np.asarray(self.encode(text), np.int64)

    def dynamic_text(self, text: str, rows: int, settings: Any, checkpoint: Any, cache: int = 0,
                     theta: float = 0.3, lam: float = 0.1, note: Any = None) -> dict[str, float]:
        """Static and dynamic (:mod:`rnnkit.tasks.dynamic`) loss and perplexity of ``text`` in
        ``rows`` streams, and with ``cache`` both with the continuous cache; the weights are
        restored afterwards."""
        import time

        from rnnkit.tasks import dynamic

        settings.check()
        ids = self.encode(text)
        rows = max(1, min(rows, len(ids) // (2 * self.cfg.data.bptt)))      # as the static score lays it out
        stream = torch.from_numpy(np.ascontiguousarray(batchify(np.asarray(ids, np.int64), rows))).to(self.device)
        started = time.perf_counter()
        with torch.no_grad():
            static = self.evaluate_text(text, rows, cache, theta, lam)
        static_seconds = time.perf_counter() - started
        stats = None
        if settings.rule == "rms":
            stats = dynamic.stats_beside(self, dynamic.check_checkpoint(checkpoint), settings, self.training_ids,
                                         rows, note)
        adapter = dynamic.Adapter(self.model, settings, stats)
        started = time.perf_counter()
        try:
            bar = lambda it: tqdm(it, desc="dynamic eval", unit="segment", file=sys.stderr, leave=False)  # noqa: E731
            collected = dynamic.dynamic_loss(self, stream, adapter, settings.segment, bar, keep_states=bool(cache))
        finally:
            adapter.reset()
        loss, tokens, skipped = collected[:3]
        out = {**static, "static_seconds": round(static_seconds, 2),
               **{f"dynamic_{k}": v for k, v in self.metrics(loss, tokens).items()},
               "dynamic_seconds": round(time.perf_counter() - started, 2), "dynamic_skipped": skipped,
               "dynamic_rule": settings.rule, "dynamic_lr": settings.rate, "dynamic_decay": settings.decay,
               "dynamic_segment": settings.segment}
        if cache:
            from rnnkit.decoding import lm_loop

            hidden, p_model, words = collected[3]
            p_cache, seen = lm_loop.cache_probs(hidden, words, cache, theta)
            mixed = lm_loop.cache_mix_loss(p_model, p_cache, seen, lam)
            out.update({f"dynamic_cache_{k}": v for k, v in self.metrics(mixed, tokens).items()})
        return out

    @torch.no_grad()
    def step_states(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """The backend interface of :mod:`rnnkit.decoding.lm_loop`: log-probabilities (B, T, V)
        of ids (B, T) continuing ``state``, and the top layer's outputs (B, T, H)."""
        self.model.eval()
        out, top, _, state = self.model.features(torch.from_numpy(ids).to(self.device), state)
        return self.model.log_probs(out).float().cpu().numpy(), top.float().cpu().numpy(), state

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        log_probs, _, state = self.step_states(ids, state)
        return log_probs, state

    @torch.no_grad()
    def target_states(self, ids: np.ndarray, targets: np.ndarray, state: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """log p(targets) (B, T) without the whole distribution (an adaptive softmax computes only
        each target's cluster), the top layer's outputs and the state."""
        self.model.eval()
        out, top, _, state = self.model.features(torch.from_numpy(ids).to(self.device), state)
        target = self.model.target_log_probs(out, torch.from_numpy(targets).to(self.device))
        return target.float().cpu().numpy(), top.float().cpu().numpy(), state

    @staticmethod
    def _progress(windows):
        return tqdm(windows, desc="eval", unit="window", file=sys.stderr, leave=False,
                    disable=None if len(windows) > 20 else True)

def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> LanguageModelTask:
    """A task for training (``with_data``) or, from a checkpoint's ``extras``, for inference."""
    return LanguageModelTask(cfg, device, extras, with_data)


def _rows(state) -> int:
    return (state[0] if isinstance(state, tuple) else state).size(1)
