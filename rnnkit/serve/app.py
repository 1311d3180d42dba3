"""``rnnkit serve``: trained models over HTTP (FastAPI on uvicorn), with request batching.

    rnnkit serve runs/en_fr/best.pt runs/sentiment/best.pt --port 8000
    curl -s localhost:8000/v1/en_fr/translate -d '{"lines": ["a man is riding a bike ."], "beam": 5}'

Routes: ``POST /v1/{model}/translate | predict | generate | forecast`` (JSON in and out),
``GET /v1/models`` (each model's card), ``GET /health``, ``GET /docs`` (OpenAPI), and ``GET /``,
a page to try the models.

Live streams (language models and forecasters): ``POST /v1/{model}/streams`` opens one
(optionally primed) and returns its id, ``POST /v1/{model}/streams/{id}`` feeds it and
answers, ``GET`` describes it, ``DELETE`` closes it. The stream's recurrent state stays in
the server between feeds, so a feed costs one step per new token; every feed that arrives
together is stepped as one batch. Idle streams expire after ``stream_idle_seconds``; at
``max_streams`` open, an open is answered 429 with a Retry-After.

Concurrent requests for one model with the same options wait in one queue and are decoded
together. Translations are batched continuously: up to ``max_batch`` sentences share one beam
search, newcomers join it between steps as others finish, and each request is answered when
its own sentences are done. Other tasks merge requests: the worker takes up to ``max_batch``
sentences, waiting at most ``max_wait_ms`` for more to arrive when fewer are queued, so a
busy server decodes at batch speed and an idle one answers at once. One worker thread makes
every model call, so the models share the cores instead of fighting over them; ``rnnkit
serve`` runs the models themselves in a process of their own (:mod:`rnnkit.serve.worker`),
so that the HTTP side does not hold them up (``build_app`` serves either). A full queue
answers 503; a malformed or oversized request gets a 4xx with ``{"error": "one line"}``;
SIGTERM stops accepting connections, answers every request already accepted, then exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import Field
from starlette.exceptions import HTTPException

from rnnkit.api import Model
from rnnkit.config import ConfigError
from rnnkit.config.tasks import TASKS
from rnnkit.data.vocab import DataError
from rnnkit.serve.batching import Batcher, Limits
from rnnkit.serve.errors import Busy, ModelProcessError, RequestError
from rnnkit.serve.live import FeedRequest, LiveStreams, StrictBody
from rnnkit.training.checkpoint import CheckpointError

PAGE = Path(__file__).with_name("serve_page.html")
ROUTES: dict[str, tuple[str, ...]] = {}     # each model route and the tasks that answer it
for _name, _task in TASKS.items():
    if _task.route:
        ROUTES[_task.route] = (*ROUTES.get(_task.route, ()), _name)


class TranslateRequest(StrictBody):
    lines: list[str] = Field(description="Source sentences, one per entry.")
    beam: int = Field(5, ge=1, le=64, description="Beam size; 1 is greedy decoding.")
    n_best: int = Field(1, ge=1, le=64, description="Hypotheses per sentence (at most beam).")
    length_penalty: float = Field(0.0, ge=0.0, le=10.0, description="GNMT length penalty alpha.")
    replace_unk: bool = Field(False, description="Replace each <unk> with the source token it attends to most.")
    attention: bool = Field(False, description="Return the best hypothesis's attention weights.")


class PredictRequest(StrictBody):
    lines: list[str] = Field(description="Sentences, tokens separated by spaces.")


class GenerateRequest(StrictBody):
    prime: str = Field("", description="Text the sample continues (not repeated in the answer).")
    length: int = Field(100, ge=1, description="Tokens to sample.")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: Optional[int] = Field(None, ge=1)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)


class ForecastRequest(StrictBody):
    csv: str = Field(description="The series as CSV text, with the columns the model was trained on.")
    at: Optional[int] = Field(None, ge=0, description="Forecast from this row (default: after the last).")
    every: bool = Field(False, description="Every window of the file instead of one.")


# ---------------------------------------------------------------------- per-task work
def _check_lines(lines: Sequence[str], limits: Limits) -> None:
    if len(lines) > limits.max_lines:
        raise RequestError(f"{len(lines)} lines in one request; at most {limits.max_lines} (--max-lines)", 413)
    for i, line in enumerate(lines):
        n = len(line.split())
        if n > limits.max_tokens:
            raise RequestError(f"line {i + 1} has {n} tokens; at most {limits.max_tokens} (--max-tokens)", 413)


def _translation(t: Any, attention: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"text": t.text, "score": round(float(t.score), 4)}
    if attention and t.attention is not None:
        rows = t.attention.tolist() if hasattr(t.attention, "tolist") else t.attention  # a list from a model process
        out["attention"] = {"source": t.src_tokens, "target": t.tgt_tokens + ["</s>"], "weights": _rounded(rows)}
        heads = getattr(t, "heads", None)
        if heads is not None:                 # several heads: "weights" is their mean, "heads" each one's
            out["attention"]["heads"] = [_rounded(h) for h in (heads.tolist() if hasattr(heads, "tolist") else heads)]
    return out


def _rounded(rows: Any) -> list[list[float]]:
    return [[round(float(w), 4) for w in row] for row in rows]


class Served:
    """One loaded model, its name and its batcher."""

    def __init__(self, name: str, model: Model, limits: Limits, executor: ThreadPoolExecutor):
        self.name, self.model, self.limits = name, model, limits
        self.batcher = Batcher(self._run, limits, executor, self._stream)
        self._solo = itertools.count()     # keys that never merge (generate, forecast)
        self._card: dict[str, Any] | None = None
        self.live = LiveStreams(name, model, limits, self.batcher)

    def _run(self, key: Hashable, items: list) -> list:
        kind = key[0]
        if kind == "translate":
            _, beam, n_best, alpha, replace_unk = key
            return self.model.translations(items, beam=beam, n_best=n_best, batch_size=self.limits.max_batch,
                                           length_penalty=alpha, replace_unk=replace_unk)
        if kind == "predict":
            return self.model.predict(items, batch_size=self.limits.max_batch)
        if kind == "streams":
            return self.model.stream_batch(items)
        return [item() for item in items]     # a solo call

    def _stream(self, key: Hashable) -> Any:
        if key[0] != "translate":
            return None
        _, beam, n_best, alpha, replace_unk = key
        return self.model.stream(beam, n_best, alpha, replace_unk, capacity=self.limits.max_batch)

    async def translate(self, req: TranslateRequest) -> dict[str, Any]:
        self.check_route("translate")
        _check_lines(req.lines, self.limits)
        if req.n_best > req.beam:
            raise RequestError(f"n_best ({req.n_best}) cannot exceed beam ({req.beam})")
        if (req.replace_unk or req.attention) and not self.model.has_attention:
            raise RequestError("replace_unk and attention need a model with attention")
        key = ("translate", req.beam, req.n_best, req.length_penalty, req.replace_unk)
        results = await self.batcher.submit(key, list(req.lines))
        if req.n_best > 1:
            return {"translations": [{**_translation(hyps[0], req.attention),
                                      "n_best": [_translation(h, False) for h in hyps]} for hyps in results]}
        return {"translations": [_translation(t, req.attention) for t in results]}

    async def predict(self, req: PredictRequest) -> dict[str, Any]:
        self.check_route("predict")
        _check_lines(req.lines, self.limits)
        results = await self.batcher.submit(("predict",), list(req.lines))
        if self.model.kind == "tagging":
            return {"predictions": [{"words": line.split(), "tags": tags} for line, tags in zip(req.lines, results)]}
        return {"predictions": results}

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        self.check_route("generate")
        if req.length > self.limits.max_length:
            raise RequestError(f"length {req.length}; at most {self.limits.max_length} (--max-length)", 413)
        if len(req.prime.split()) > self.limits.max_tokens * 10:
            raise RequestError("prime is too long", 413)
        call = lambda: self.model.generate(req.prime, req.length, req.temperature, req.top_k,  # noqa: E731
                                           req.top_p, req.seed)
        [text] = await self.batcher.submit(("solo", next(self._solo)), [call])
        return {"text": text}

    async def forecast(self, req: ForecastRequest) -> dict[str, Any]:
        self.check_route("forecast")

        def call() -> list:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "series.csv"
                path.write_text(req.csv, encoding="utf-8")
                try:
                    return self.model.forecast(path, at=req.at, every=req.every, batch_size=self.limits.max_batch)
                except (ConfigError, DataError) as err:
                    raise RequestError(str(err).replace(str(path), "csv")) from None

        [rows] = await self.batcher.submit(("solo", next(self._solo)), [call])
        return {"forecasts": rows}

    def check_route(self, route: str) -> None:
        """A model answers only its task's route; any other gets a 404 that names the right one."""
        if self.model.kind not in ROUTES[route]:
            hint = next((r for r, k in ROUTES.items() if self.model.kind in k), None)
            raise RequestError(f"model '{self.name}' is a {self.model.kind} model: it has no /{route}"
                               + (f"; use /v1/{self.name}/{hint}" if hint else ""), 404)

    def card(self) -> dict[str, Any]:
        if self._card is None:      # read from the checkpoint once
            self._card = {"name": self.name, **self.model.card(), "streams": TASKS[self.model.kind].streams}
            if self.model.kind == "translation":
                self._card["attention"] = self.model.has_attention
        return {**self._card, "batches": self.batcher.batches, "sentences_served": self.batcher.items_done,
                "streams_open": len(self.live.streams)}


# ---------------------------------------------------------------------- the app
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _one_line(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the body is not valid JSON"
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ())]
    where = ".".join(loc[1:] if loc[:1] == ["body"] and len(loc) > 1 else loc)
    message = str(first.get("msg", "invalid request"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, (f"{where}: {message}" if where else message) + more


class _Counted:
    """ASGI middleware counting the HTTP requests received and those answered in full."""

    def __init__(self, app: Any, counts: dict[str, int]):
        self.app, self.counts = app, counts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counts["received"] += 1

        async def counted(message: dict) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.counts["answered"] += 1

        await self.app(scope, receive, counted)


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 before it is read."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                response = _error(413, f"the body is over {self.limit} bytes (--max-body)")
                await response(scope, receive, send)
                return
            seen = 0

            async def limited() -> dict:     # a body without a length is counted as it comes
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(f"the body is over {self.limit} bytes (--max-body)", 413)
                return message

            await self.app(scope, limited, send)
            return
        await self.app(scope, receive, send)


def build_app(models: dict[str, Model], limits: Limits = Limits(),
              on_shutdown: Callable[[dict[str, int]], None] | None = None) -> FastAPI:
    """The HTTP app serving ``models`` (name -> loaded model). ``on_shutdown`` hears the counts
    of requests received and answered once the server has drained."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnkit-model")
    served = {name: Served(name, m, limits, executor) for name, m in models.items()}
    counts = {"received": 0, "answered": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        workers = [asyncio.create_task(s.batcher.serve_forever()) for s in served.values()]
        workers.append(asyncio.create_task(_expiring()))
        yield
        for w in workers:
            w.cancel()
        executor.shutdown(wait=True)
        if on_shutdown is not None:
            on_shutdown(dict(counts))

    async def _expiring() -> None:
        every = max(0.05, min(1.0, limits.stream_idle_seconds / 4))
        while True:
            await asyncio.sleep(every)
            for s in served.values():
                if s.live.streams:
                    await s.live.expire()

    app = FastAPI(title="rnnkit", summary="Trained recurrent sequence models over HTTP.",
                  description="Each loaded model answers on `/v1/{model}/...` for its task: translation "
                              "models on `translate`, taggers and classifiers on `predict`, language models "
                              "on `generate`, forecasters on `forecast`. Language models and forecasters "
                              "also keep live streams (`/v1/{model}/streams`): the recurrent state stays on "
                              "the server between feeds. Errors are `{\"error\": \"...\"}`.",
                  lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=limits.max_body)
    app.add_middleware(_Counted, counts=counts)      # outermost: sees every request

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a body meant for another route fails validation first: name the model's task and route instead
        parts = request.url.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "v1" and parts[2] in ROUTES:
            try:
                get(parts[1]).check_route(parts[2])
            except RequestError as err:
                return _error(err.status, str(err))
        return _error(*_one_line(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body could not be read (is it UTF-8 JSON?)"
        elif exc.status_code in (404, 405):
            detail = f"{detail}: {request.method} {request.url.path} (the routes are listed at /docs)"
        return _error(exc.status_code, detail)

    @app.exception_handler(RequestError)
    async def _request(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"error": "the server is busy; try again shortly"}, status_code=503,
                            headers={"Retry-After": "1"})

    async def _user(request: Request, exc: Exception) -> JSONResponse:
        return _error(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    for user_error in (ConfigError, DataError, CheckpointError):
        app.add_exception_handler(user_error, _user)

    @app.exception_handler(ModelProcessError)
    async def _gone(request: Request, exc: ModelProcessError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:   # logged by uvicorn too
        return _error(500, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])

    def get(name: str) -> Served:
        if name not in served:
            raise RequestError(f"no model named '{name}'; loaded: {', '.join(sorted(served))}", 404)
        return served[name]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness: ok and the loaded models (503 once the model process has exited)")
    async def health() -> Any:
        down = sorted(n for n, s in served.items() if not getattr(s.model, "alive", True))
        if down:      # the model process died (e.g. killed for memory): a supervisor should restart us
            return _error(503, f"the model process has exited; not serving {', '.join(down)}")
        return {"status": "ok", "models": sorted(served),
                "queued": {n: s.batcher.waiting for n, s in served.items()},
                "streams": {n: len(s.live.streams) for n, s in served.items()}}

    @app.get("/v1/models", summary="Each loaded model's card: task, sizes, vocabulary, training summary")
    async def list_models() -> dict[str, Any]:
        return {"models": [s.card() for s in served.values()]}

    @app.post("/v1/{model}/translate", summary="Translate sentences (translation models)")
    async def translate(model: str, req: TranslateRequest) -> dict[str, Any]:
        return await get(model).translate(req)

    @app.post("/v1/{model}/predict", summary="Tags or labels with probabilities (taggers, classifiers)")
    async def predict(model: str, req: PredictRequest) -> dict[str, Any]:
        return await get(model).predict(req)

    @app.post("/v1/{model}/generate", summary="Sample text (language models)")
    async def generate(model: str, req: GenerateRequest) -> dict[str, Any]:
        return await get(model).generate(req)

    @app.post("/v1/{model}/forecast", summary="Forecast a series (forecasters)")
    async def forecast(model: str, req: ForecastRequest) -> dict[str, Any]:
        return await get(model).forecast(req)

    @app.post("/v1/{model}/streams", summary="Open a live stream (language models, forecasters), primed or not")
    async def open_stream(model: str, req: FeedRequest) -> dict[str, Any]:
        return await get(model).live.open(req)

    @app.post("/v1/{model}/streams/{sid}", summary="Feed a stream: text (or ids) for a language model, rows "
                                                   "for a forecaster; answers from the state after them")
    async def feed_stream(model: str, sid: str, req: FeedRequest) -> dict[str, Any]:
        return await get(model).live.feed(sid, req)

    @app.get("/v1/{model}/streams/{sid}", summary="A stream's position, age and idle time")
    async def describe_stream(model: str, sid: str) -> dict[str, Any]:
        return get(model).live.describe(sid)

    @app.delete("/v1/{model}/streams/{sid}", summary="Close a stream")
    async def close_stream(model: str, sid: str) -> dict[str, Any]:
        return await get(model).live.close(sid)

    return app


def model_names(checkpoints: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` -> {name: path}; names unique. A checkpoint is named after its
    run folder (after its file where that folder has no name: ``/best.pt``), an export folder
    after itself."""
    names: dict[str, str] = {}
    for spec in checkpoints:
        name, sep, path = spec.partition("=")
        if not sep:
            where = Path(spec).resolve()
            path, name = spec, where.name if where.is_dir() else where.parent.name or where.stem
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError("", f"model name {name!r}: use letters, digits, '-', '_' and '.' (NAME=PATH)")
        if name in names:
            raise ConfigError("", f"two models named '{name}': name them with NAME=PATH")
        names[name] = path
    return names
