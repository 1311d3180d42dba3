"""Continuous batching: concurrent requests for one model merged into batched calls."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from rnnkit.config import ConfigError
from rnnkit.serve.errors import Busy


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32          # sentences decoded together
    max_wait_ms: float = 5.0     # how long a batch waits for company when the queue is short
    max_queue: int = 1024        # sentences waiting, per model; beyond it: 503
    max_body: int = 1 << 20      # bytes per request body; beyond it: 413
    max_lines: int = 256         # lines per request
    max_tokens: int = 400        # whitespace-separated tokens per line
    max_length: int = 5000       # tokens per generate request
    max_streams: int = 10_000    # live streams open at once, per model; beyond it: 429
    stream_idle_seconds: float = 600.0   # a stream not fed for this long is closed

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body", "max_lines", "max_tokens", "max_length", "max_streams"):
            if getattr(self, name) < 1:
                raise ConfigError("", f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise ConfigError("", "--max-wait-ms must be >= 0")
        if not self.stream_idle_seconds > 0:
            raise ConfigError("", "--stream-idle-seconds must be > 0")


@dataclass(eq=False)            # compared and hashed by identity: a stream's tags hold it
class _Pending:
    key: Hashable
    items: list
    future: asyncio.Future
    taken: int = 0                      # items handed to a stream so far
    results: list = field(default_factory=list)
    remaining: int = 0                  # items a stream has not answered yet


@dataclass
class Batcher:
    """Merges concurrent requests that share a key into one call of ``run(key, items)``, which
    returns one result per item. Requests are served in arrival order; a batch takes the oldest
    request and every later one with the same key while it has room.

    Where ``stream(key)`` gives a stream (``add(items, tags)``, ``step()``, ``room``, ``live``:
    :meth:`rnnkit.api.Translator.stream`), requests are batched continuously instead: items join
    the running decode between its steps as others finish, and each request is answered as soon
    as its own items are done."""
    run: Callable[[Hashable, list], list]
    limits: Limits
    executor: ThreadPoolExecutor
    stream: Callable[[Hashable], Any] | None = None
    queue: deque = field(default_factory=deque)
    batches: int = 0
    items_done: int = 0
    _wake: asyncio.Event | None = None

    async def submit(self, key: Hashable, items: list) -> list:
        if self.waiting + len(items) > self.limits.max_queue:
            raise Busy()
        future = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(key, items, future))
        self._event().set()
        return await future

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    @property
    def waiting(self) -> int:
        """Items queued, not yet running."""
        return sum(len(p.items) - p.taken for p in self.queue)

    @property
    def _join_group(self) -> int:
        return max(1, self.limits.max_batch // 4)

    def _leading(self, key: Hashable) -> int:
        """Items not yet started in the requests with ``key`` at the head of the queue."""
        n = 0
        for p in self.queue:
            if p.key != key:
                break
            n += len(p.items) - p.taken
        return n

    def _room(self, key: Hashable) -> int:
        return sum(len(p.items) for p in self.queue if p.key == key)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._event()
        while True:
            while not self.queue:
                wake.clear()
                await wake.wait()
            key = self.queue[0].key
            stream = self.stream(key) if self.stream is not None else None
            if stream is not None:
                await self._run_stream(key, stream)
                continue
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while self._room(key) < self.limits.max_batch and loop.time() < deadline:
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), deadline - loop.time())
            batch: list[_Pending] = []
            size = 0
            for p in list(self.queue):
                if p.key == key and (not batch or size + len(p.items) <= self.limits.max_batch):
                    batch.append(p)
                    size += len(p.items)
                    self.queue.remove(p)
            items = [x for p in batch for x in p.items]
            try:
                results = await loop.run_in_executor(self.executor, self.run, key, items)
            except Exception as err:  # noqa: BLE001 - a merged batch failed: find whose request it was
                if len(batch) == 1:
                    self._settle(batch[0], error=err)
                    continue
                for p in batch:         # each alone, so that one bad request fails only itself
                    try:
                        self._settle(p, await loop.run_in_executor(self.executor, self.run, key, p.items))
                    except Exception as alone:  # noqa: BLE001
                        self._settle(p, error=alone)
                continue
            self.batches += 1
            self.items_done += len(items)
            start = 0
            for p in batch:
                self._settle(p, results[start:start + len(p.items)])
                start += len(p.items)

    async def _run_stream(self, key: Hashable, stream: Any) -> None:
        """Decode with ``stream`` while requests with ``key`` lead the queue or it has items in
        flight. A request whose items cannot start fails alone; a failed step fails every
        request in flight."""
        loop = asyncio.get_running_loop()
        flight: set[_Pending] = set()
        while True:
            new: list[tuple[_Pending, list, list]] = []
            room = stream.room
            if stream.live >= self.limits.max_batch // 2 and self._leading(key) < min(room, self._join_group):
                room = 0     # a busy decode takes newcomers a few at a time: each join costs a step's worth
            while self.queue and self.queue[0].key == key and (room or not self.queue[0].items):
                p = self.queue[0]
                if not p.taken:
                    p.results, p.remaining = [None] * len(p.items), len(p.items)
                take = p.items[p.taken:p.taken + room]
                new.append((p, take, [(p, p.taken + i) for i in range(len(take))]))
                flight.add(p)
                p.taken += len(take)
                room -= len(take)
                if p.taken == len(p.items):
                    self.queue.popleft()
            if not new and not stream.live:
                return
            try:
                done, failed = await loop.run_in_executor(self.executor, _stream_tick, stream, new)
            except Exception as err:  # noqa: BLE001 - the decode itself failed
                for p in flight:
                    self._settle(p, error=err)
                    with contextlib.suppress(ValueError):
                        self.queue.remove(p)
                return
            if new:
                self.batches += 1
            for p, err in failed:
                self._settle(p, error=err)
                flight.discard(p)
                with contextlib.suppress(ValueError):
                    self.queue.remove(p)
            for p in [p for p, _, _ in new if not p.items]:
                self._settle(p, [])
                flight.discard(p)
            self.items_done += len(done)
            for (p, i), result in done:
                p.results[i] = result
                p.remaining -= 1
                if not p.remaining:
                    self._settle(p, p.results)
                    flight.discard(p)

    def _settle(self, p: _Pending, results: list | None = None, error: Exception | None = None) -> None:
        if p.future.done():             # a client that went away leaves a cancelled future
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(results)


def _stream_tick(stream: Any, new: list[tuple[_Pending, list, list]]) -> tuple[list, list]:
    """In the worker thread: start the new items (each request alone if together they fail),
    then one step. Returns the finished ``(tag, result)`` pairs and the requests that failed."""
    done, failed = [], []
    if new:
        try:
            done += stream.add([x for _, items, _ in new for x in items], [t for _, _, tags in new for t in tags])
        except Exception:  # noqa: BLE001 - find whose items they were
            for p, items, tags in new:
                try:
                    done += stream.add(items, tags)
                except Exception as err:  # noqa: BLE001
                    failed.append((p, err))
    if stream.live:
        done += stream.step()
    return done, failed


# ---------------------------------------------------------------------- request bodies
