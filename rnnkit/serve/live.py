"""``rnnkit serve``'s live streams: the routes' side of :mod:`rnnkit.decoding.streams`.

The front keeps each open stream's times and position (for ``GET``, expiry and
``--max-streams``), the model side keeps its state; every open, feed and close goes through
the model's batcher, so the feeds that arrive together are one batch of the model.
"""
from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from rnnkit.config.tasks import TASKS
from rnnkit.decoding.streams import FeedError
from rnnkit.serve.batching import Batcher, Limits
from rnnkit.serve.errors import RequestError


class StrictBody(BaseModel):
    """A request body: no unknown keys, no coerced types."""
    model_config = ConfigDict(extra="forbid", strict=True)


class FeedRequest(StrictBody):
    text: Optional[str] = Field(None, description="Language models: text that continues the stream's.")
    ids: Optional[list[int]] = Field(None, description="Language models: token ids instead of text.")
    rows: Optional[list[Union[list[float], dict[str, float]]]] = Field(
        None, description="Forecasters: the rows that arrived, each a list in the model's column order or an "
                          "object by column name.")
    top_k: int = Field(5, ge=0, le=1000, description="Language models: the likeliest next tokens to return.")
    continuation: int = Field(0, ge=0, le=1000, description="Language models: tokens to sample after the feed.")
    advance: bool = Field(False, description="Whether the stream's state moves on over the sampled continuation.")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)


_LM_OPTIONS = ("top_k", "continuation", "advance", "temperature", "top_p", "seed")


class LiveStreams:
    """One served model's live streams."""

    def __init__(self, name: str, model: Any, limits: Limits, batcher: Batcher):
        self.name, self.model, self.limits, self.batcher = name, model, limits, batcher
        self.streams: dict[str, dict[str, Any]] = {}   # open stream id -> opened, used, position, busy
        self.expired = 0

    def check(self) -> str:
        """What this model's streams are fed (``text``, ``rows``), or a 400 saying why it has none."""
        entry = TASKS[self.model.kind]
        if entry.streams is None:
            raise RequestError(f"model '{self.name}' is a {self.model.kind} model and has no streams: "
                               f"{entry.no_streams}")
        return entry.streams

    def _piece(self, req: FeedRequest, fed: str, opening: bool) -> tuple[Any, dict[str, Any]]:
        given = {k: v for k, v in (("text", req.text), ("ids", req.ids), ("rows", req.rows)) if v is not None}
        allowed = ("text", "ids") if fed == "text" else ("rows",)
        wrong = [k for k in given if k not in allowed]
        if wrong:
            raise RequestError(f"'{wrong[0]}' does not feed this model's streams; they take "
                               f"{' or '.join(repr(k) for k in allowed)}", 422)
        if len(given) > 1:
            raise RequestError("give one of 'text' and 'ids'", 422)
        if not given and not opening:
            raise RequestError(f"a feed needs {' or '.join(repr(k) for k in allowed)}", 422)
        piece = next(iter(given.values()), None)
        if isinstance(piece, str) and len(piece) > self.limits.max_tokens * 20:
            raise RequestError(f"text of {len(piece)} characters in one feed; at most "
                               f"{self.limits.max_tokens * 20}", 413)
        if isinstance(piece, list) and len(piece) > self.limits.max_length:
            raise RequestError(f"{len(piece)} entries in one feed; at most {self.limits.max_length} (--max-length)",
                               413)
        if fed == "rows":
            chosen = [k for k in _LM_OPTIONS if k in req.model_fields_set]
            if chosen:
                raise RequestError(f"'{chosen[0]}' is for language-model streams", 422)
            return piece, {}
        if req.continuation > self.limits.max_length:
            raise RequestError(f"continuation {req.continuation}; at most {self.limits.max_length} (--max-length)",
                               413)
        return piece, {k: getattr(req, k) for k in _LM_OPTIONS}

    async def _stream_op(self, op: tuple) -> Any:
        [answer] = await self.batcher.submit(("streams",), [op])
        if isinstance(answer, FeedError):
            raise RequestError(str(answer), answer.status)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def open(self, req: FeedRequest) -> dict[str, Any]:
        fed = self.check()
        piece, options = self._piece(req, fed, opening=True)
        if len(self.streams) >= self.limits.max_streams:
            await self.expire()
            if len(self.streams) >= self.limits.max_streams:
                raise RequestError(f"{len(self.streams)} streams are open, the most this server keeps "
                                   f"(--max-streams); close one or try again later", 429)
        sid = secrets.token_hex(8)
        now = time.monotonic()
        self.streams[sid] = {"opened": now, "used": now, "position": 0, "busy": 1}
        try:
            answer = await self._stream_op(("open", sid, piece, options))
        except BaseException:
            self.streams.pop(sid, None)
            raise
        info = self.streams[sid]
        info.update(busy=0, used=time.monotonic(), position=answer.get("position", 0))
        return {"id": sid, **answer}

    def _info(self, sid: str) -> dict[str, Any]:
        if sid not in self.streams:
            raise RequestError(f"no stream '{sid}' on model '{self.name}' (closed, expired or never opened)", 404)
        return self.streams[sid]

    async def feed(self, sid: str, req: FeedRequest) -> dict[str, Any]:
        fed = self.check()
        info = self._info(sid)
        piece, options = self._piece(req, fed, opening=False)
        info["busy"] += 1
        try:
            answer = await self._stream_op(("feed", sid, piece, options))
        except RequestError as err:
            if err.status == 404:              # the model side no longer has it
                self.streams.pop(sid, None)
            raise
        finally:
            info["busy"] -= 1
            info["used"] = time.monotonic()
        info["position"] = answer.get("position", info["position"])
        return {"id": sid, **answer}

    def describe(self, sid: str) -> dict[str, Any]:
        self.check()
        info = self._info(sid)
        now = time.monotonic()
        return {"id": sid, "position": info["position"], "age_seconds": round(now - info["opened"], 3),
                "idle_seconds": round(0.0 if info["busy"] else now - info["used"], 3)}

    async def close(self, sid: str) -> dict[str, Any]:
        self.check()
        self._info(sid)
        del self.streams[sid]
        with contextlib.suppress(RequestError):
            await self._stream_op(("close", sid))
        return {"id": sid, "closed": True}

    async def expire(self) -> int:
        """Close the streams idle for longer than ``stream_idle_seconds``; how many."""
        limit = time.monotonic() - self.limits.stream_idle_seconds
        old = [sid for sid, info in self.streams.items() if not info["busy"] and info["used"] < limit]
        for sid in old:
            del self.streams[sid]
        if old:
            self.expired += len(old)
            chunk = max(1, self.limits.max_queue // 2)     # closes queue as requests do: never past the queue
            for lo in range(0, len(old), chunk):
                with contextlib.suppress(Exception):
                    await self.batcher.submit(("streams",), [("close", sid) for sid in old[lo:lo + chunk]])
        return len(old)
