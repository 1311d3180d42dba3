"""Many live streams, each with its own carried state, fed together: a language model fed text
as it arrives, a forecaster fed rows as they arrive. Written once for every backend (it
imports neither torch nor onnxruntime; torch only where the states are torch tensors).

A stream's whole past is its state, so feeding it one more piece costs one step per new
token, whatever came before. :class:`LMStreams` keeps every stream's recurrent state as one
row of a slab (:class:`StateRows`) and steps all the streams fed at the same moment as one
batch; :class:`ForecastStreams` keeps each stream's last ``input_length`` rows, which is
what a forecaster reads (its windows are normalised per window, so a forecast starts from
the window, not from a carried state), and forecasts every stream fed at once in one batch.

A feed is checked whole before anything changes: a bad one raises :class:`FeedError` and
leaves its stream as it was. :meth:`StreamBook.feed` takes many feeds and answers each,
an error in one failing only that one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rnnkit.data.vocab import EOS
from rnnkit.decoding.state_rows import StateRows, put_rows, take_rows


class FeedError(ValueError):
    """A feed or an open that cannot be served as asked (its stream is left as it was);
    ``status`` is the HTTP status a server answers it with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status

    def __reduce__(self):            # its status survives a pipe to and from a model process
        return FeedError, (str(self), self.status)


# ---------------------------------------------------------------------- the books
@dataclass
class Stream:
    """What a book knows of one stream besides its state."""
    row: int
    position: int = 0                 # tokens (or rows) consumed so far
    opened: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"position": self.position, "age_seconds": round(now - self.opened, 3),
                "idle_seconds": round(now - self.used, 3)}


def not_a_feed(prime: Any) -> bool:
    """Whether an open's prime is empty (the stream opens without a first feed)."""
    return prime is None or (isinstance(prime, (str, list)) and not prime)


class StreamBook:
    """Streams by id: ``open``, ``feed`` (many at once), ``close``, ``describe``."""

    kind = ""

    def __init__(self) -> None:
        self.streams: dict[Any, Stream] = {}

    def __len__(self) -> int:
        return len(self.streams)

    def __contains__(self, sid: Any) -> bool:
        return sid in self.streams

    def _get(self, sid: Any) -> Stream:
        if sid not in self.streams:
            raise FeedError(f"no stream {sid!r} (closed, expired or never opened)", 404)
        return self.streams[sid]

    def describe(self, sid: Any) -> dict[str, Any]:
        return self._get(sid).describe()

    def open(self, sid: Any, prime: Any = None, **options: Any) -> dict[str, Any]:
        """A new stream, fed ``prime`` first when given; its answer to that feed (or its
        description)."""
        if sid in self.streams:
            raise FeedError(f"stream {sid!r} is open already", 409)
        self.streams[sid] = self._new_stream()
        if not_a_feed(prime):
            return self.streams[sid].describe()
        [answer] = self.feed([(sid, prime, options)])
        if isinstance(answer, Exception):
            self.close(sid)
            raise answer
        return answer

    def close(self, sid: Any) -> None:
        stream = self._get(sid)
        del self.streams[sid]
        self._forget(stream)

    def feed(self, feeds: Sequence[tuple[Any, Any, dict[str, Any]]]) -> list:
        """Answers to ``feeds`` ((id, piece, options) each), in order: a dict, or the
        :class:`FeedError` that feed raised. A stream fed twice in one call takes its pieces
        in order."""
        answers: list = [None] * len(feeds)
        pending = list(range(len(feeds)))
        while pending:                                   # rounds: each stream at most once per round
            seen, now, later = set(), [], []
            for i in pending:
                (later if feeds[i][0] in seen else now).append(i)
                seen.add(feeds[i][0])
            checked = []
            for i in now:
                sid, piece, options = feeds[i]
                try:
                    stream = self._get(sid)
                    try:
                        checked.append((i, stream, self._check(piece, **(options or {}))))
                    except TypeError as err:      # an option this kind of stream does not take
                        raise FeedError(f"not an option of a {self.kind} stream: {err}") from None
                except FeedError as err:
                    answers[i] = err
            if checked:
                for (i, stream, _), answer in zip(checked, self._run([(s, c) for _, s, c in checked])):
                    stream.used = time.monotonic()
                    answers[i] = answer
            pending = later
        return answers

    # what each kind of book provides
    def _new_stream(self) -> Stream:
        raise NotImplementedError

    def _forget(self, stream: Stream) -> None:
        pass

    def _check(self, piece: Any, **options: Any) -> Any:
        raise NotImplementedError

    def _run(self, work: list[tuple[Stream, Any]]) -> list:
        raise NotImplementedError


@dataclass
class _LMFeed:
    ids: list[int]
    top_k: int = 5
    continuation: int = 0
    advance: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None


class LMStreams(StreamBook):
    """Language-model streams over a backend with ``step(ids, state)`` (:mod:`lm_loop`): each
    feed's tokens continue its stream's text; the answer holds the ``top_k`` likeliest next
    tokens and, when asked, a ``continuation`` of sampled tokens, over which the stream's
    state advances only with ``advance``. Streams fed the same number of tokens at once are
    one call of the model."""

    kind = "lm"

    def __init__(self, model: Any, encode_piece: Callable[[str], list[int]], vocab: Sequence[str], word: bool,
                 unk: int, max_tokens: int = 4096):
        super().__init__()
        self.model, self.encode_piece, self.vocab = model, encode_piece, list(vocab)
        self.word, self.unk, self.max_tokens = word, unk, max_tokens
        self.rows = StateRows()

    def _new_stream(self) -> Stream:
        return Stream(self.rows.allocate())

    def _forget(self, stream: Stream) -> None:
        self.rows.release(stream.row)
        if not self.rows.sparse:
            return
        moved = self.rows.compact({sid: s.row for sid, s in self.streams.items()})
        for sid, row in moved.items():
            self.streams[sid].row = row

    @property
    def state_bytes(self) -> int:
        """Bytes of the states of the open streams (one row of the slab each)."""
        return self.rows.row_bytes() * len(self.streams)

    def _check(self, piece: Any, top_k: int = 5, continuation: int = 0, advance: bool = False,
               temperature: float = 1.0, top_p: float | None = None, seed: int | None = None) -> _LMFeed:
        if isinstance(piece, str):
            ids = self.encode_piece(piece)
        elif isinstance(piece, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in piece):
            bad = [t for t in piece if not 0 <= t < len(self.vocab)]
            if bad:
                raise FeedError(f"token id {bad[0]} is outside the vocabulary [0, {len(self.vocab)})")
            ids = list(piece)
        else:
            raise FeedError("a language-model feed is text or a list of token ids")
        if not ids:
            raise FeedError("the feed holds no token (a stream is fed at least one)")
        if len(ids) > self.max_tokens:
            raise FeedError(f"the feed holds {len(ids)} tokens; at most {self.max_tokens} at once", 413)
        if not 0 <= top_k <= len(self.vocab):
            raise FeedError(f"top_k must be in [0, {len(self.vocab)}], got {top_k}")
        if continuation < 0 or continuation > self.max_tokens:
            raise FeedError(f"continuation must be in [0, {self.max_tokens}], got {continuation}")
        if not temperature > 0 or temperature != temperature:
            raise FeedError(f"temperature must be > 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise FeedError(f"top_p must be in (0, 1], got {top_p}")
        return _LMFeed(ids, top_k, continuation, advance, temperature, top_p, seed)

    def _run(self, work: list[tuple[Stream, _LMFeed]]) -> list:
        last: list[np.ndarray | None] = [None] * len(work)
        groups: dict[int, list[int]] = {}
        for j, (_, f) in enumerate(work):
            groups.setdefault(len(f.ids), []).append(j)
        for members in groups.values():               # one call per length fed
            rows = [work[j][0].row for j in members]
            ids = np.asarray([work[j][1].ids for j in members], dtype=np.int64)
            log_probs, state = self.model.step(ids, self.rows.take(rows))
            self.rows.put(rows, state)
            for k, j in enumerate(members):
                last[j] = log_probs[k, -1]
                work[j][0].position += ids.shape[1]
        samples = self._continue([(j, work[j][0], work[j][1]) for j in range(len(work)) if work[j][1].continuation],
                                 last)
        answers = []
        for j, (stream, f) in enumerate(work):
            answer: dict[str, Any] = {"position": stream.position, "fed": len(f.ids), "top": self._top(last[j], f.top_k)}
            if j in samples:
                answer["continuation"] = {"text": self._text(samples[j]), "tokens": samples[j]}
            answers.append(answer)
        return answers

    def _continue(self, asked: list[tuple[int, Stream, _LMFeed]], last: list) -> dict[int, list[int]]:
        """Sampled continuations, every asking stream stepped together; ``last`` becomes the
        distribution after each continuation where the stream advances over it."""
        from rnnkit.decoding.lm_loop import sample_next

        if not asked:
            return {}
        rngs = [np.random.default_rng(f.seed) for _, _, f in asked]
        state = self.rows.take([s.row for _, s, _ in asked])
        scores = [last[j].astype(np.float64) for j, _, _ in asked]
        out: dict[int, list[int]] = {j: [] for j, _, _ in asked}
        for t in range(max(f.continuation for _, _, f in asked)):
            active = [k for k, (_, _, f) in enumerate(asked) if f.continuation > t]
            tokens = []
            for k in active:
                j, _, f = asked[k]
                scores[k][self.unk] = -np.inf
                tokens.append(sample_next(scores[k], f.temperature, None, f.top_p, rngs[k]))
                out[j].append(tokens[-1])
            rows = np.asarray(active, dtype=np.int64)
            log_probs, new = self.model.step(np.asarray(tokens, dtype=np.int64)[:, None], take_rows(state, rows))
            put_rows(state, rows, new)
            for n, k in enumerate(active):
                scores[k] = log_probs[n, -1].astype(np.float64)
        keep = [k for k, (_, _, f) in enumerate(asked) if f.advance]
        if keep:
            self.rows.put([asked[k][1].row for k in keep], take_rows(state, np.asarray(keep, dtype=np.int64)))
            for k in keep:
                j, stream, f = asked[k]
                stream.position += f.continuation
                last[j] = scores[k]
        return out

    def _top(self, log_probs: np.ndarray, k: int) -> list[list[Any]]:
        if not k:
            return []
        best = np.argpartition(-log_probs, k - 1)[:k] if k < log_probs.size else np.arange(log_probs.size)
        order = best[np.argsort(-log_probs[best], kind="stable")]
        return [[self.vocab[i], float(np.exp(log_probs[i]))] for i in order]

    def _text(self, ids: list[int]) -> str:
        if not self.word:
            return "".join(self.vocab[i] for i in ids)
        return "".join("\n" if self.vocab[i] == EOS else self.vocab[i] + " " for i in ids)


def apply_ops(book: StreamBook, ops: Sequence[tuple]) -> list:
    """A server's batch of ``("open", id, piece, options)``, ``("feed", id, piece, options)``
    and ``("close", id)`` on ``book``: the answers in order (a dict, None for a close, or the
    op's :class:`FeedError`). Every feed of the batch, primes included, is one
    :meth:`StreamBook.feed`."""
    answers: list = [None] * len(ops)
    feeds, where = [], []
    for i, op in enumerate(ops):
        if op[0] == "open":
            try:
                book.open(op[1])
            except FeedError as err:
                answers[i] = err
                continue
            if not_a_feed(op[2]):
                answers[i] = book.describe(op[1])
                continue
        if op[0] in ("open", "feed"):
            feeds.append((op[1], op[2], op[3]))
            where.append(i)
    for i, answer in zip(where, book.feed(feeds) if feeds else []):
        if ops[i][0] == "open" and isinstance(answer, Exception):
            book.close(ops[i][1])          # an open whose prime fails opens nothing
        answers[i] = answer
    for i, op in enumerate(ops):
        if op[0] == "close":
            try:
                book.close(op[1])
            except FeedError as err:
                answers[i] = err
    return answers


class OneStream:
    """A single stream of a book, for a program that follows one live sequence:
    ``feed(piece, **options)`` returns the answer (or raises its :class:`FeedError`)."""

    def __init__(self, book: StreamBook):
        self.book = book
        book.open(0)

    @property
    def position(self) -> int:
        return self.book.streams[0].position

    def feed(self, piece: Any, **options: Any) -> dict[str, Any]:
        [answer] = self.book.feed([(0, piece, options)])
        if isinstance(answer, Exception):
            raise answer
        return answer


class ForecastStreams(StreamBook):
    """Forecaster streams over a :class:`~rnnkit.tasks.forecast_text.ForecastText`: each feed's
    rows (numbers in the model's input columns, as lists in column order or as objects by
    column name) follow its stream's earlier rows; once ``input_length`` rows have arrived,
    the answer holds the forecast of the next ``horizon`` rows of the target columns, in
    original units. Every stream fed at once is one call of the model."""

    kind = "forecast"

    def __init__(self, forecaster: Any, max_rows: int = 100_000):
        super().__init__()
        self.forecaster, self.max_rows = forecaster, max_rows
        self.length = forecaster.cfg.data.input_length
        self.columns = list(forecaster.columns)
        self._rows: dict[int, np.ndarray] = {}        # a stream's last rows, standardised
        self._ids = 0

    def _new_stream(self) -> Stream:
        self._ids += 1
        self._rows[self._ids] = np.zeros((0, len(self.columns)), np.float32)
        return Stream(self._ids)

    def _forget(self, stream: Stream) -> None:
        del self._rows[stream.row]

    def _check(self, piece: Any) -> np.ndarray:
        if not isinstance(piece, list) or not piece:
            raise FeedError("a forecaster feed is a non-empty list of rows")
        if len(piece) > self.max_rows:
            raise FeedError(f"the feed holds {len(piece)} rows; at most {self.max_rows} at once", 413)
        values = np.empty((len(piece), len(self.columns)), np.float64)
        for n, row in enumerate(piece):
            if isinstance(row, dict):
                missing = [c for c in self.columns if c not in row]
                if missing:
                    raise FeedError(f"row {n}: no value for column {missing[0]!r} (the columns: "
                                    f"{', '.join(self.columns)})")
                row = [row[c] for c in self.columns]
            if not isinstance(row, list) or len(row) != len(self.columns):
                raise FeedError(f"row {n}: expected {len(self.columns)} numbers ({', '.join(self.columns)})")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
                raise FeedError(f"row {n}: every value must be a number")
            values[n] = row
        if not np.isfinite(values).all():
            raise FeedError("a row holds a value that is not finite")
        return self.forecaster.scaler.transform(values).astype(np.float32)

    def _run(self, work: list[tuple[Stream, np.ndarray]]) -> list:
        ready = []
        for stream, values in work:
            rows = np.concatenate([self._rows[stream.row], values])[-self.length:]
            self._rows[stream.row] = rows
            stream.position += len(values)
            if len(rows) == self.length:
                ready.append(stream)
        forecasts: dict[int, np.ndarray] = {}
        if ready:
            x = np.stack([self._rows[s.row] for s in ready])
            f = self.forecaster
            y = f.scaler.inverse(f.predict_windows(x).astype(np.float64), f.targets)
            forecasts = {s.row: y[n] for n, s in enumerate(ready)}
        answers = []
        for stream, _ in work:
            answer: dict[str, Any] = {"position": stream.position, "columns": list(self.forecaster.target_names)}
            if stream.row in forecasts:
                answer["forecast"] = forecasts[stream.row].tolist()
            else:
                answer["forecast"] = None
                answer["needs_rows"] = self.length - len(self._rows[stream.row])
            answers.append(answer)
        return answers
