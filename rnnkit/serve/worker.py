"""``rnnkit serve``'s model process: the loaded models run in a process of their own.

The HTTP side (uvicorn, FastAPI, JSON) and the models' Python code each need Python's lock,
and under load they took it from each other at every decoder step: the model's thread spent
about a fifth of its time waiting. Here the front process keeps the HTTP side and the
batching (:mod:`rnnkit.serve`), and :class:`ModelProcess` runs the models in a child process
with a lock of its own; the front's model thread calls into it over a pipe, one call at a
time (:class:`RemoteModel`, :class:`RemoteStream` mirror :class:`rnnkit.api.Model` and its
stream). Results come back as plain Python values; user errors come back as the same
``ConfigError``/``DataError``/``CheckpointError``/``RequestError`` with the same message.

The child ignores SIGINT and SIGTERM: the front decides when to stop (after answering every
request it accepted) and closes the pipe, and the child exits when the pipe closes, also if
the front dies.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import signal
import threading
from typing import Any, Callable, Sequence

from rnnkit.config import ConfigError
from rnnkit.data.vocab import DataError
from rnnkit.serve.errors import ModelProcessError, RequestError
from rnnkit.training.checkpoint import CheckpointError


def _describe(err: BaseException) -> tuple[str, str, int]:
    kind = next((c.__name__ for c in (ConfigError, DataError, CheckpointError, RequestError) if isinstance(err, c)),
                "other")
    message = str(err) if kind != "other" else f"{type(err).__name__}: {err}"
    return kind, message, getattr(err, "status", 400)


def _rebuild(kind: str, message: str, status: int) -> Exception:
    if kind == "ConfigError":
        return ConfigError("", message)
    if kind == "RequestError":
        return RequestError(message, status)
    return {"DataError": DataError, "CheckpointError": CheckpointError}.get(kind, ModelProcessError)(message)


def _plain(x: Any) -> Any:
    """Results with their tensors as lists (a translation's attention), for the pipe."""
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_replace"):      # a stream's (tag, result) pairs
        return tuple(_plain(v) for v in x)
    attention, heads = getattr(x, "attention", None), getattr(x, "heads", None)
    if hasattr(attention, "tolist"):
        return x._replace(attention=attention.tolist(), heads=None if heads is None else heads.tolist())
    return x


# ---------------------------------------------------------------------- in the child
def _child(conn: Any, checkpoints: dict[str, str], device: str, precision: str, int8: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the front stops us, when it has drained
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import rnnkit

    try:
        models = {name: rnnkit.load(path, device=device, precision=precision, int8=int8,
                                    note=lambda text: conn.send(("note", text)))
                  for name, path in checkpoints.items()}
        info = {}
        for name, m in models.items():
            info[name] = {"kind": m.kind, "card": m.card(), "attention": getattr(m, "has_attention", False),
                          "path": m.path}
    except Exception as err:  # noqa: BLE001 - reported to the front, which raises it
        conn.send(("err", *_describe(err)))
        return
    conn.send(("ready", info))
    streams: dict[int, Any] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        op, args = message
        try:
            if op == "call":
                name, method, a, kw = args
                reply = _plain(getattr(models[name], method)(*a, **kw))
            elif op == "open":
                sid, name, a = args
                streams[sid] = models[name].stream(*a)
                reply = None
            elif op == "add":
                sid, lines, tags = args
                reply = _plain(streams[sid].add(lines, tags))
            elif op == "step":
                reply = _plain(streams[args].step())
            else:                       # "close"
                streams.pop(args, None)
                reply = None
        except Exception as err:  # noqa: BLE001 - every error goes back to its caller
            conn.send(("err", *_describe(err)))
            continue
        try:
            conn.send(("ok", reply))
        except Exception as err:  # noqa: BLE001 - a result that cannot be pickled (sent whole or not at all)
            conn.send(("err", *_describe(err)))


# ---------------------------------------------------------------------- in the front
class ModelProcess:
    """The child process holding ``checkpoints`` (name -> path); ``models`` maps each name to a
    :class:`RemoteModel`. Load errors are raised here, as ``rnnkit.load`` raises them."""

    def __init__(self, checkpoints: dict[str, str], device: str = "auto", precision: str = "fp32",
                 int8: bool = False, note: Callable[[str], None] | None = None):
        ctx = mp.get_context("spawn")        # no copy of the front's threads and event loop
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.process = ctx.Process(target=_child, args=(child, checkpoints, device, precision, int8),
                                   name="rnnkit-models", daemon=True)
        self.process.start()
        child.close()
        while True:
            kind, *rest = self._receive()
            if kind == "note":
                if note is not None:
                    note(rest[0])
                continue
            if kind == "err":
                self.close()
                raise _rebuild(*rest)
            break
        self.models = {name: RemoteModel(self, name, info) for name, info in rest[0].items()}

    def _gone(self) -> ModelProcessError:
        return ModelProcessError(f"the model process exited (code {self.process.exitcode})")

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None

    def call(self, op: str, args: Any) -> Any:
        """One call in the child; its result, or its error raised here."""
        with self._lock:
            try:
                self._conn.send((op, args))
            except (OSError, ValueError):
                raise self._gone() from None
            kind, *rest = self._receive()
        if kind == "err":
            raise _rebuild(*rest)
        return rest[0]

    def next_id(self) -> int:
        return next(self._ids)

    def close(self, timeout: float = 30.0) -> None:
        """Ask the child to exit and wait for it (killed after ``timeout`` seconds)."""
        with self._lock:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class RemoteModel:
    """A model in the :class:`ModelProcess`: the methods of :class:`rnnkit.api.Model` that the
    server calls (each blocks until the child answers; call them from one thread)."""

    def __init__(self, host: ModelProcess, name: str, info: dict[str, Any]):
        self._host, self.name = host, name
        self.kind, self.path, self.has_attention = info["kind"], info["path"], info["attention"]
        self._card = info["card"]

    @property
    def alive(self) -> bool:
        """Whether the model process still runs."""
        return self._host.process.is_alive()

    def card(self) -> dict[str, Any]:
        return dict(self._card)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._host.call("call", (self.name, method, args, kwargs))

    def translations(self, lines: Sequence[str], *args: Any, **kwargs: Any) -> list:
        return self._call("translations", list(lines), *args, **kwargs)

    def predict(self, lines: Sequence[str], *args: Any, **kwargs: Any) -> list:
        return self._call("predict", list(lines), *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> str:
        return self._call("generate", *args, **kwargs)

    def forecast(self, path: Any, *args: Any, **kwargs: Any) -> list:
        return self._call("forecast", str(path), *args, **kwargs)

    def stream_batch(self, ops: Sequence[tuple]) -> list:
        return self._call("stream_batch", list(ops))

    def stream(self, beam: int = 1, n_best: int = 1, length_penalty: float = 0.0, replace_unk: bool = False,
               capacity: int = 32) -> "RemoteStream":
        return RemoteStream(self._host, self.name, (beam, n_best, length_penalty, replace_unk, capacity), capacity)


class RemoteStream:
    """A translation stream in the child (see :meth:`rnnkit.api.Translator.stream`). It opens
    there at its first ``add`` and closes once nothing is left in it; ``room`` and ``live``
    are kept here, so that reading them costs no call."""

    def __init__(self, host: ModelProcess, name: str, options: tuple, capacity: int):
        self._host, self._name, self._options = host, name, options
        self._sid: int | None = None
        self._tags: dict[int, Any] = {}
        self._ids = itertools.count()
        self.room, self.live = capacity, 0

    def add(self, lines: Sequence[str], tags: Sequence[Any]) -> list[tuple[Any, Any]]:
        if self._sid is None:
            sid = self._host.next_id()
            self._host.call("open", (sid, self._name, self._options))
            self._sid = sid
        keys = [next(self._ids) for _ in tags]
        done = self._host.call("add", (self._sid, list(lines), keys))
        self._tags.update(zip(keys, tags))
        # the empty lines are done at once and take no room
        started = len(keys) - len(done)
        self.room -= started
        self.live += started
        return self._settle(done)

    def step(self) -> list[tuple[Any, Any]]:
        done = self._settle(self._host.call("step", self._sid))
        self.room += len(done)
        self.live -= len(done)
        if not self.live:
            self._host.call("close", self._sid)
            self._sid = None
        return done

    def _settle(self, done: list[tuple[int, Any]]) -> list[tuple[Any, Any]]:
        return [(self._tags.pop(key), result) for key, result in done]
