"""Use a trained model from Python: ``rnnkit.load(checkpoint)``.

    import rnnkit
    m = rnnkit.load("runs/en_fr/best.pt", device="auto", precision="fp32")
    m.translate(["a man is riding a bike ."], beam=5)      # -> ["un homme fait du vélo ."]

``load`` returns an object for the checkpoint's task, with the methods that task supports:
:class:`Translator` (``translate``, ``score``), :class:`LanguageModel` (``generate``,
``score``), :class:`Tagger` and :class:`Classifier` (``predict``, ``score``),
:class:`Forecaster` (``forecast``, ``score``). Plain Python values go in and come out, and
the ``rnnkit`` commands print what these methods return. A bad argument, file or checkpoint
raises :class:`~rnnkit.config.ConfigError`, :class:`~rnnkit.data.vocab.DataError` or
:class:`~rnnkit.training.checkpoint.CheckpointError`, each with a one-line message.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

from rnnkit.config import ConfigError

PRECISIONS = ("fp32", "bf16")


def inference_arithmetic(task: Any, precision: str = "fp32", int8: bool = False,
                         note: Callable[[str], None] | None = None) -> Callable[[], ContextManager]:
    """Set a loaded task up for fp32 (as trained), bf16 (autocast) or int8 (dynamically
    quantised linear and LSTM/GRU layers, CPU) inference; returns a factory of the context
    each call runs under. ``note`` hears the notice that this CPU lacks native bf16."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError("", f"--precision must be fp32 or bf16, got {precision!r}")
    if int8:
        if precision == "bf16":
            raise ConfigError("", "--int8 and --precision bf16 do not combine (int8 layers take fp32 inputs); "
                                  "choose one")
        if task.device.type != "cpu":
            raise ConfigError("", "--int8 is for CPU decoding (dynamic quantisation has no GPU kernels)")
        import warnings

        with warnings.catch_warnings():    # torch's notice that its quantised tensors are deprecated
            warnings.simplefilter("ignore")
            layers = {torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU}
            task.model = torch.ao.quantization.quantize_dynamic(task.model, layers, dtype=torch.qint8)
    if precision == "fp32":
        return contextlib.nullcontext
    from rnnkit.hardware import autocast, bf16_note

    if task.device.type == "cpu" and note is not None:
        text = bf16_note()
        if text:
            note(text)
    return lambda: autocast(task.device.type, torch.bfloat16)


class Model:
    """A loaded checkpoint. ``task`` is the underlying task object (model, vocabularies)."""

    def __init__(self, task: Any, arithmetic: Callable[[], ContextManager], path: str, int8: bool = False):
        self.task, self._arithmetic, self.path, self._int8 = task, arithmetic, path, int8
        self._book: Any = None        # the server's streams (stream_batch)

    @property
    def kind(self) -> str:
        """The task: ``translation``, ``lm``, ``tagging``, ``classification``, ``forecast``, ..."""
        return self.task.cfg.task

    @property
    def config(self) -> dict[str, Any]:
        from rnnkit.config import config_to_dict

        return config_to_dict(self.task.cfg)

    @property
    def backend(self) -> str:
        """``torch`` for a checkpoint, ``onnxruntime`` for an export folder."""
        return getattr(self.task, "backend", "torch")

    def card(self) -> dict[str, Any]:
        """What the model is: task, parameters, vocabulary sizes, and the run's training summary."""
        if self.backend != "torch":
            return self.task.card()
        from rnnkit.reports import model_card

        return model_card(self.path)

    @contextlib.contextmanager
    def running(self):
        """The context every call of this model runs in: no autograd, the chosen arithmetic.
        For code that calls ``task`` directly."""
        if self.backend != "torch":
            yield
            return
        import torch

        with torch.inference_mode(), self._arithmetic():
            yield

    def _run(self, fn: Callable[[], Any]) -> Any:
        with self.running():
            return fn()

    def streams(self) -> Any:
        """Live streams, each with its state kept between feeds: ``open(id, piece)``,
        ``feed([(id, piece, options), ...])`` (all fed at once, stepped as one batch),
        ``describe(id)``, ``close(id)`` (:mod:`rnnkit.decoding.streams`). Language models
        are fed text, forecasters rows; other tasks have none (a one-line error says why)."""
        from rnnkit.config.tasks import TASKS

        entry = TASKS[self.kind]
        if entry.streams is None:
            raise ConfigError("", f"a {self.kind} model has no live streams: {entry.no_streams}")
        return _Running(self, self.task.streams())

    def stream_batch(self, ops: Sequence[tuple]) -> list:
        """The server's entry to :meth:`streams`: ``ops`` are ``("open", id, piece, options)``,
        ``("feed", id, piece, options)`` or ``("close", id)``; the answers in order (a dict,
        None for a close, or the :class:`~rnnkit.decoding.streams.FeedError` of that op).
        Every feed of one batch, a prime included, is one step of the model per length fed."""
        from rnnkit.decoding.streams import apply_ops

        if self._book is None:
            self._book = self.streams()
        return apply_ops(self._book, ops)

    def __repr__(self) -> str:
        return f"<rnnkit {type(self).__name__} {self.kind} from {self.path}>"


def _lines(lines: str | Sequence[str]) -> list[str]:
    if isinstance(lines, str):
        return [lines]
    if not all(isinstance(x, str) for x in lines):
        raise ConfigError("", "expected a string or a list of strings")
    return list(lines)


class Stream:
    """A task's stream (``add``, ``step``, ``room``, ``live``) whose calls run in the model's
    arithmetic, as the other methods of :class:`Model` do."""

    def __init__(self, model: Model, inner: Any):
        self._model, self._inner = model, inner

    @property
    def room(self) -> int:
        return self._inner.room

    @property
    def live(self) -> int:
        return self._inner.live

    def add(self, lines: Sequence[str], tags: Sequence[Any]) -> list[tuple[Any, Any]]:
        return self._model._run(lambda: self._inner.add(lines, tags))

    def step(self) -> list[tuple[Any, Any]]:
        return self._model._run(self._inner.step)


class Translator(Model):
    @property
    def has_attention(self) -> bool:
        """Whether the decoder attends (attention weights, ``replace_unk``)."""
        return self.task.cfg.model.decoder.attention != "none"

    def translate(self, lines: str | Sequence[str], beam: int = 1, n_best: int = 1, batch_size: int = 64,
                  length_penalty: float = 0.0, replace_unk: bool = False) -> list[str] | list[list[str]]:
        """The translation of each line, in order (an empty line gives ""); with ``n_best`` > 1
        a list of the n best per line."""
        return [[h.text for h in r] if n_best > 1 else r.text
                for r in self.translations(lines, beam, n_best, batch_size, length_penalty, replace_unk)]

    def translations(self, lines: str | Sequence[str], beam: int = 1, n_best: int = 1, batch_size: int = 64,
                     length_penalty: float = 0.0, replace_unk: bool = False) -> list:
        """As :meth:`translate`, with each hypothesis's score, tokens and attention
        (:class:`rnnkit.tasks.translation_text.Translation`; its attention a numpy array)."""
        self._check(beam, n_best, batch_size, replace_unk)
        items = _lines(lines)
        return self._run(lambda: self.task.translate(items, beam=beam, n_best=n_best, batch_size=batch_size,
                                                     alpha=length_penalty, replace_unk=replace_unk))

    def stream(self, beam: int = 1, n_best: int = 1, length_penalty: float = 0.0, replace_unk: bool = False,
               capacity: int = 32) -> "Stream":
        """Continuous batching for a server: up to ``capacity`` sentences decoded together,
        joining and leaving between steps (:class:`rnnkit.tasks.translation_text.TranslationStream`)."""
        self._check(beam, n_best, capacity, replace_unk)
        return Stream(self, self.task.stream(beam, n_best, length_penalty, replace_unk, capacity))

    def _check(self, beam: int, n_best: int, batch_size: int, replace_unk: bool) -> None:
        if beam < 1 or n_best < 1 or batch_size < 1:
            raise ConfigError("", "beam, n_best and batch_size must be at least 1")
        if n_best > beam:
            raise ConfigError("", f"--n-best ({n_best}) cannot exceed --beam ({beam})")
        if replace_unk and not self.has_attention:
            raise ConfigError("", "--replace-unk and --attention-plots need a model with attention")

    def score(self, sources: Sequence[str], references: Sequence[str], beam: int = 1,
              batch_size: int = 64) -> dict[str, Any]:
        """BLEU and chrF (sacreBLEU) of the translations against ``references``, and perplexity."""
        from rnnkit.metrics import bleu, chrf, perplexity

        sources, references = _lines(sources), _lines(references)
        if len(sources) != len(references):
            raise ConfigError("", f"{len(sources)} sources but {len(references)} references")
        hyps = self.translate(sources, beam=beam, batch_size=batch_size)
        loss, _ = self._run(lambda: self.task.score_pairs(sources, references, batch_size))
        return {"bleu": bleu(hyps, references), "chrf": chrf(hyps, references), "loss": loss,
                "ppl": perplexity(loss), "sentences": len(sources), "beam": beam}


class LanguageModel(Model):
    def generate(self, prime: str = "", length: int = 100, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> str:
        """``length`` sampled tokens after ``prime`` (not repeated), as text."""
        return "".join(self.stream(prime, length, temperature, top_k, top_p, seed))

    def stream(self, prime: str = "", length: int = 100, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
        """As :meth:`generate`, a piece of text at a time (the options are checked at the call).
        The same seed gives the same text with the same backend (torch or onnxruntime), not
        across the two."""
        if temperature <= 0:
            raise ConfigError("", f"--temperature must be > 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError("", f"--top-p must be in (0, 1], got {top_p}")
        return self._pieces(self.task.generate(prime, length, temperature, top_k, top_p, seed))

    @contextlib.contextmanager
    def adapted(self, text: str, dynamic: Any, note: Callable[[str], None] | None = None):
        """Within the block, the model's weights have adapted to ``text`` by dynamic evaluation
        (:class:`rnnkit.tasks.dynamic.Dynamic`: a gradient step per segment, as it reads it);
        restored after. ``generate --dynamic`` samples in such a block after its prime."""
        from rnnkit.tasks import dynamic as dyn

        if self.backend != "torch":
            raise ConfigError("", f"{self.path}: an export has no gradients; --dynamic needs the checkpoint")
        dynamic.check()
        ids = self.task.encode(text) if text else []
        if len(ids) < 2:
            raise ConfigError("", "--dynamic adapts to the prime: give a --prime of at least two tokens")
        import torch

        stats = None
        if dynamic.rule == "rms":
            stats = dyn.stats_beside(self.task, dyn.check_checkpoint(self.path), dynamic, self.task.training_ids,
                                     1, note)
        adapter = dyn.Adapter(self.task.model, dynamic, stats)
        try:
            with self._arithmetic():
                dyn.dynamic_loss(self.task, torch.tensor([ids], device=self.task.device), adapter, dynamic.segment)
            yield self
        finally:
            adapter.reset()

    def incremental(self):
        """Text fed a piece at a time, the state kept: ``feed(text)`` returns the next token's
        probabilities (one step per token), ``log_probs`` each fed token's log-probability,
        ``top(k)`` the likeliest next tokens (:class:`rnnkit.decoding.lm_loop.Incremental`)."""
        return _Running(self, self.task.incremental())

    def _pieces(self, pieces: Iterator[str]) -> Iterator[str]:
        while True:
            with self._arithmetic():
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece

    def score(self, text: str, streams: int = 16, cache: int = 0, cache_theta: float = 0.3,
              cache_lambda: float = 0.1, dynamic: Any = None,
              note: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Loss and perplexity of ``text`` (bits per character for character LMs); with ``cache``
        (word LMs), also with a continuous cache over that many positions; with ``dynamic`` (a
        :class:`rnnkit.tasks.dynamic.Dynamic`), also while the model adapts to the text as it
        reads it (``dynamic_*`` entries; a checkpoint only; the weights are restored after)."""
        if cache and self.task.cfg.data.tokenizer != "word":
            raise ConfigError("", "--cache is for word-level language models")
        if dynamic is None:
            return self._run(lambda: self.task.evaluate_text(text, streams, cache, cache_theta, cache_lambda))
        if self.backend != "torch":
            raise ConfigError("", f"{self.path}: an export has no gradients; --dynamic needs the checkpoint")
        if self._int8:
            raise ConfigError("", "--dynamic learns while it reads: it needs fp32 or bf16 weights, not --int8")
        with self._arithmetic():          # not inference mode: it takes gradients
            return self.task.dynamic_text(text, streams, dynamic, self.path, cache, cache_theta, cache_lambda, note)


class Tagger(Model):
    def predict(self, lines: str | Sequence[str], batch_size: int = 64) -> list[list[str]]:
        """A tag per whitespace-separated word of each line ([] for an empty line)."""
        items = _lines(lines)
        out = self._run(lambda: self.task.predict(items, batch_size))
        return [text.split() for text in out]

    def score(self, path: str | Path, batch_size: int = 64) -> dict[str, Any]:
        """Token accuracy and, for BIO/BIOES tags, span precision, recall and F1 of a tagged file."""
        return self._run(lambda: self.task.evaluate_file(str(_existing(path)), batch_size))


class Classifier(Model):
    def predict(self, lines: str | Sequence[str], batch_size: int = 64) -> list[dict[str, Any] | None]:
        """Per line: ``{"label", "probability", "probabilities": {label: p}}`` (with attention
        pooling also ``"attention": [(word, weight), ...]``); None for an empty line."""
        items = _lines(lines)
        return self._run(lambda: self.task.predict_details(items, batch_size))

    def score(self, path: str | Path, batch_size: int = 64) -> dict[str, Any]:
        """Accuracy, macro-F1 and the confusion matrix of a ``label<TAB>text`` file."""
        return self._run(lambda: self.task.evaluate_file(str(_existing(path)), batch_size))


class Forecaster(Model):
    def forecast(self, csv: str | Path, at: int | None = None, every: bool = False,
                 batch_size: int = 64) -> list[dict[str, Any]]:
        """Forecasts of the series in ``csv`` (original units): the window at row ``at`` (default:
        after the file's end) or ``every`` window; one dict per (origin, step, column)."""
        rows = self._run(lambda: self.task.forecast_file(str(_existing(csv)), at, every, batch_size))
        return [{"origin": origin, "timestamp": when, "step": step, "column": column, "value": float(value),
                 "truth": float(truth) if truth != "" else None}
                for origin, when, step, column, value, truth in rows]

    def incremental(self):
        """A series fed rows as they arrive: ``feed(rows)`` (lists in the model's column order,
        or dicts by column name) returns ``{"position", "columns", "forecast"}``, the forecast
        of the next ``horizon`` rows from the last ``input_length`` (None, with ``needs_rows``,
        until that many have arrived); the same values as :meth:`forecast` at that row."""
        from rnnkit.decoding.streams import OneStream

        return _Running(self, OneStream(self.task.streams()))

    def online(self, csv: str | Path, start: int, end: int | None = None, settings: Any = None,
               progress: Callable = iter) -> dict[str, Any]:
        """Replay ``csv`` as a stream from row ``start`` (:mod:`rnnkit.tasks.online`): at each
        arriving row, forecast the next ``horizon`` rows, then learn by ``settings``' protocol
        (an :class:`~rnnkit.tasks.online.Online`; leak-free by default). The model stays
        adapted afterwards (``save`` writes it). Returns the cumulative MSE and MAE
        (standardised, as the literature reports) of the online and the frozen model, and
        ``forecasts``, ``frozen`` (n, H, T, original units), ``truth`` and ``origins``."""
        from rnnkit.tasks.online import Online, replay

        if self.backend != "torch":
            raise ConfigError("", f"{self.path}: an export has no gradients; online learning needs the checkpoint")
        settings = (settings or Online()).check()
        t = self.task
        series = t.read(str(_existing(csv)), t.columns)
        values = t.standardised_values(series)
        length, horizon, n = t.cfg.data.input_length, t.cfg.data.horizon, len(series)
        end = n if end is None else end
        if not length <= start <= end - horizon or end > n:
            raise ConfigError("", f"--start {start} / --end {end}: the online rows need {length} rows before the "
                                  f"start, {horizon} after the last origin, and at most the file's {n} rows")
        origins = np.arange(start, end - horizon + 1)
        from rnnkit.data.series import gather_windows

        frozen = t.predict_windows(np.ascontiguousarray(gather_windows(values, origins, length, 0)))
        with self._arithmetic():
            forecasts, learner = replay(t, iter(values[:end]), start, len(origins), settings, progress)
        truth = gather_windows(values, origins, 0, horizon)[..., t.targets].astype(np.float64)
        out: dict[str, Any] = {"windows": len(origins), "rows": f"[{start}, {end})", "protocol": settings.protocol,
                               "updates": learner.updates, "skipped": learner.skipped}
        for name, pred in (("online", forecasts), ("frozen", frozen)):
            err = pred.astype(np.float64) - truth
            out[f"{name}_mse"] = float(np.square(err).mean())
            out[f"{name}_mae"] = float(np.abs(err).mean())
            out[f"{name}_curve"] = np.cumsum(np.square(err).mean((1, 2))) / np.arange(1, len(err) + 1)
        out["mse_vs_frozen"] = out["online_mse"] / out["frozen_mse"] if out["frozen_mse"] else float("nan")
        inverse = lambda x: t.scaler.inverse(x.astype(np.float64), t.targets)  # noqa: E731
        out.update(origins=origins, forecasts=inverse(forecasts), frozen=inverse(frozen), truth=inverse(truth))
        return out

    def learner(self, history: Sequence[Sequence[float]], settings: Any = None) -> "LiveForecaster":
        """A forecaster that learns from live observations: ``history`` (at least
        ``input_length`` rows, original units, the model's column order) is what arrived so
        far; each ``arrive(row)`` learns by ``settings``' protocol (leak-free; the published
        one needs the future and is for :meth:`online` only) and returns the forecast of the
        next ``horizon`` rows (original units, (H, T))."""
        from rnnkit.tasks.online import Online, OnlineLearner

        if self.backend != "torch":
            raise ConfigError("", f"{self.path}: an export has no gradients; online learning needs the checkpoint")
        settings = (settings or Online()).check()
        if settings.protocol != "leak-free":
            raise ConfigError("", "a live learner learns only from what has arrived: protocol leak-free")
        rows = np.asarray(history, np.float64)
        if rows.ndim != 2 or rows.shape[1] != len(self.task.columns) or len(rows) < self.task.cfg.data.input_length:
            raise ConfigError("", f"history: at least {self.task.cfg.data.input_length} rows of "
                                  f"{len(self.task.columns)} values ({', '.join(self.task.columns)})")
        return LiveForecaster(self, OnlineLearner(self.task, settings, self.task.scaler.transform(rows)))

    def save(self, path: str | Path) -> Path:
        """Write the model as it is now (after ``online``) as a new checkpoint at ``path``
        (never over the checkpoint it was loaded from)."""
        from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint

        path = Path(path)
        if path.resolve() == Path(self.path).resolve():
            raise ConfigError("", f"{path}: that is the checkpoint the model came from; choose a new file")
        ckpt = load_checkpoint(self.path)
        ckpt["model"] = {k: v.detach().cpu() for k, v in self.task.model.state_dict().items()}
        ckpt.pop("format", None)
        ckpt.pop("rnnkit_version", None)
        save_checkpoint(ckpt, path)
        return path

    def score(self, csv: str | Path, split: str | None = None, batch_size: int = 64) -> dict[str, Any]:
        """MSE and MAE beside the last-value and seasonal baselines, on every window or ``split``'s."""
        if split is not None and split not in ("train", "valid", "test"):
            raise ConfigError("", f"--split must be train, valid or test, got {split!r}")
        return self._run(lambda: self.task.evaluate_file(str(_existing(csv)), batch_size, split))


class LiveForecaster:
    """:meth:`Forecaster.learner`'s object: ``arrive(row)`` -> the next forecast; ``learner``
    is the :class:`~rnnkit.tasks.online.OnlineLearner` (``updates``, ``skipped``)."""

    def __init__(self, model: Forecaster, learner: Any):
        self.model, self.learner = model, learner

    def forecast(self) -> np.ndarray:
        t = self.model.task
        with self.model._arithmetic():
            return t.scaler.inverse(self.learner.forecast().astype(np.float64), t.targets)

    def arrive(self, row: Sequence[float]) -> np.ndarray:
        t = self.model.task
        values = np.asarray(row, np.float64)
        if values.shape != (len(t.columns),) or not np.isfinite(values).all():
            raise ConfigError("", f"a row is {len(t.columns)} finite numbers ({', '.join(t.columns)})")
        with self.model._arithmetic():
            self.learner.arrive(t.scaler.transform(values[None])[0])
        return self.forecast()


class _Running:
    """An object whose method calls run in the model's context (no autograd, its arithmetic)."""

    def __init__(self, model: Model, inner: Any):
        self._model, self._inner = model, inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._model._run(lambda: value(*args, **kwargs))


def _existing(path: str | Path) -> Path:
    from rnnkit.data.vocab import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    return p


def _kind(task: Any) -> type[Model]:
    """The class its registration names for a loaded task."""
    from rnnkit.config.tasks import TASKS, resolve

    return resolve(TASKS[task.cfg.task].api)


def load(checkpoint: str | Path, device: str = "auto", precision: str = "fp32", int8: bool = False,
         note: Callable[[str], None] | None = None) -> Model:
    """The model in ``checkpoint`` (``best.pt`` or ``last.pt``) ready for inference on
    ``device`` (``auto``: CUDA when present), in ``precision`` fp32 or bf16, or with ``int8``
    layers (CPU). ``checkpoint`` may also be a folder written by ``rnnkit export``: the same
    object comes back, run by onnxruntime without torch (its arithmetic was chosen at export)."""
    from rnnkit.runtime import is_export, load_export

    if is_export(checkpoint):
        chosen = [o for o, v, d in (("--device", device, "auto"), ("--precision", precision, "fp32"),
                                    ("--int8", int8, False)) if v != d]
        if chosen:
            raise ConfigError("", f"{', '.join(chosen)} apply to checkpoints; an export runs as it was exported "
                                  f"(rnnkit export --int8 chooses int8)")
        task = load_export(checkpoint)
        return _kind(task)(task, contextlib.nullcontext, str(checkpoint))
    from rnnkit.runs import load_task

    task = load_task(checkpoint, device)
    arithmetic = inference_arithmetic(task, precision, int8, note)
    return _kind(task)(task, arithmetic, str(checkpoint), int8)
