"""The HTTP routes of API.md, as one front-end worker serves them (FastAPI, run by uvicorn in worker.py).

The body is read and decoded here rather than by FastAPI's body parameter, so every failure gets
API.md's status (400 for bytes that are not JSON, 413 past the byte limit, 422 for schema) and shape.
A request goes: validation -> tokenization -> the engine process (engine_client.py) -> aggregation
-> encoding, each stage timed in /metrics. /health answers 503 until this worker has its tokenizer
from the engine process and has answered a warm-up request, while draining, and once the engine
process is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .config import Settings
from .engine_client import EngineClient
from .errors import ApiError, Backend, BadRequest, PayloadTooLarge, Timeout, Unauthorized, Unhealthy
from .frontend import Frontend
from .metrics import Metrics, render
from .schemas import PredictRequest, TokenResult, parse_request
from .ui import add_page

log = logging.getLogger("nerserve")
PREDICT_ROUTES = ("/predict_tokens", "/predict", "/v1/models/model:predict")
#: requests up to this size are tokenized and aggregated on the event loop (the worker's one interpreter would
#: run a thread's Python no sooner, and the hop costs); larger ones go to a thread, so the loop keeps answering
#: its other connections while the tokenizer (which releases the interpreter lock) works
INLINE_TEXTS, INLINE_CHARS = 256, 100_000
#: a refused request's body is read and dropped up to this many bytes before the answer, so clients that
#: send their whole body before reading (Python's urllib, requests) read the 413/401 instead of a reset
DRAIN_BYTES = 64 << 20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclasses.dataclass
class WorkerState:
    """What this worker has of the model: nothing while the engine process loads, then its tokenizer."""

    client: EngineClient
    frontend: Frontend | None = None
    info: dict[str, Any] | None = None
    failure: str | None = None
    closing: bool = False

    def ready(self) -> Frontend:
        """The frontend, or Unhealthy saying why there is none to serve with."""
        if self.closing:
            raise Unhealthy("the server is shutting down")
        if self.failure:
            raise Unhealthy(self.failure)
        if self.frontend is None:
            raise Unhealthy("model is loading")
        if not self.client.alive:
            raise Unhealthy("the engine process exited")
        return self.frontend


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(error: ApiError) -> Response:
    return _json(error.body(), error.status, error.headers)


class Envelope:
    """Request id (`x-request-id` honoured or made), API key, `x-total-time-ms`, the request counter, one
    structured log line per request, and the reading of a refused request's body (DRAIN_BYTES). Plain
    ASGI rather than `@app.middleware("http")`, whose task group and body streams cost more than the
    rest of a small request."""

    OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/ui", "/")  # the page is public; its fetches send the key
    ROUTES = (*PREDICT_ROUTES, "/health", "/info", "/metrics")

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, headers: Headers) -> bool:
        # `Authorization: Bearer <key>`, Baseten's `Authorization: Api-Key <key>`, or an `Api-Key` header
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        supplied = credential.strip() if scheme.lower() in ("bearer", "api-key") else headers.get("api-key", "")
        return supplied == self.api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        status = 500
        body_read = False

        async def tracked_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode("latin-1", "replace"))]
                if not body_read and not await _drain(tracked_receive, lambda: body_read, headers):
                    extra.append((b"connection", b"close"))  # past the bound (or 100-continue): close cleanly
                timing = f"{(time.perf_counter() - started) * 1000:.2f}"
                extra.append((b"x-total-time-ms", timing.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if self.api_key and scope["path"] not in self.OPEN_PATHS and not self._authorized(headers):
            refusal = _error(Unauthorized("missing or wrong API key (Authorization: Bearer <key> or Api-Key <key>)"))
            await refusal(scope, tracked_receive, send_with_headers)
        else:
            await self.app(scope, tracked_receive, send_with_headers)
        elapsed_ms = (time.perf_counter() - started) * 1000
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        log.info(
            '{"request_id":"%s","worker":%d,"method":"%s","path":"%s","status":%d,"ms":%.2f}',
            request_id,
            os.getpid(),
            scope["method"],
            route,
            status,
            elapsed_ms,
        )


async def _drain(receive: Receive, done: Callable[[], bool], headers: Headers) -> bool:
    """Read and drop the rest of a request body the answer did not need, up to DRAIN_BYTES; True when
    all of it was read (the connection can stay open). A client waiting for `100 Continue` has sent
    nothing: the answer goes at once, and the connection closes after it."""
    if headers.get("expect", "").lower() == "100-continue":
        return False
    drained = 0
    while not done():
        drained += len((await receive()).get("body", b""))
        if drained > DRAIN_BYTES:
            return False
    return True


def create_app(settings: Settings, state: WorkerState, metrics: Metrics) -> FastAPI:
    """One worker's ASGI app."""
    app = FastAPI(
        title="nerserve",
        version=__version__,
        description="BEI-Bert-compatible token classification with transformers-pipeline-exact answers.",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """Unknown routes and methods answer in API.md's error shape too."""
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "Validation")
        return _json({"error": str(error.detail), "error_type": kind}, error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error")
        return _error(Backend(f"{type(error).__name__}: {error}"))

    app.add_middleware(Envelope, api_key=settings.api_key, metrics=metrics)

    async def predict(request: Request) -> Response:
        try:
            frontend = state.ready()
            payload = await _read_json(request, settings.max_body_bytes)
            parsed = parse_request(payload, settings.max_texts)
            return await _answer(request, state.client, frontend, parsed, settings, metrics)
        except ApiError as error:
            return _error(error)

    body_schema = {"content": {"application/json": {"schema": PredictRequest.model_json_schema()}}, "required": True}
    error_schema = {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error", "error_type"],
                    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
                }
            }
        }
    }
    responses = {
        "200": {
            "description": "One list per text",
            "content": {
                "application/json": {
                    "schema": {"type": "array", "items": {"type": "array", "items": TokenResult.model_json_schema()}}
                }
            },
        },
        **{
            str(code): {"description": why, **error_schema}
            for code, why in [
                (400, "Not JSON"),
                (401, "Unauthorized"),
                (413, "Too large"),
                (422, "Validation"),
                (429, "Overloaded"),
                (500, "Backend"),
                (503, "Unhealthy"),
                (504, "Timeout"),
            ]
        },
    }
    for path in PREDICT_ROUTES:
        app.add_api_route(
            path,
            predict,
            methods=["POST"],
            name=f"predict{path}",
            response_class=Response,
            openapi_extra={"requestBody": body_schema, "responses": responses},
        )

    def when_ready(body: Callable[[], Any]) -> Response:
        """`body()` as JSON once this worker can serve, else 503 saying why."""
        try:
            state.ready()
        except ApiError as error:
            return _error(error)
        return _json(body())

    @app.get("/health")
    async def health() -> Response:
        return when_ready(lambda: {"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        return when_ready(lambda: state.info)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(render(), media_type="text/plain; version=0.0.4")

    add_page(app)
    return app


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing a wrong content type (400), too many bytes (413), bad UTF-8 or JSON (400)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if not (content_type.endswith("/json") or content_type.endswith("+json")):
        raise BadRequest(f"content-type must be application/json, not {content_type!r}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"body is not valid JSON (UTF-8): {error}") from None


async def _answer(
    request: Request,
    client: EngineClient,
    frontend: Frontend,
    parsed: PredictRequest,
    settings: Settings,
    metrics: Metrics,
) -> Response:
    """Tokenize, score on the engine (bounded by the timeout, abandoned if the client goes away),
    aggregate, encode. Large requests are tokenized and aggregated in a thread, so this worker's event
    loop keeps answering its other connections meanwhile."""
    started = time.perf_counter()
    texts = parsed.texts()
    inline = len(texts) <= INLINE_TEXTS and sum(len(text) for text in texts) <= INLINE_CHARS

    async def off_loop(function: Callable[..., Any], *args: Any) -> Any:
        return function(*args) if inline else await asyncio.to_thread(function, *args)

    async def respond() -> bytes:
        prepared = await off_loop(frontend.prepare, parsed)
        tokenized = time.perf_counter()
        metrics.stage("tokenization", tokenized - started)
        scores = await client.score(prepared.sequences, prepared.keep_logits)
        scored = time.perf_counter()
        items = await off_loop(frontend.answer, prepared, scores)
        aggregated = time.perf_counter()
        metrics.stage("aggregation", aggregated - scored)
        body = orjson.dumps(items)
        metrics.stage("encoding", time.perf_counter() - aggregated)
        metrics.texts.inc(len(prepared.texts))
        metrics.tokens.inc(prepared.tokens)
        return body

    work = asyncio.ensure_future(respond())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {work, gone}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
    if work not in done:
        work.cancel()  # the engine drops what it has not run; the arena block is kept until it says so
        if gone in done:
            return Response(status_code=499)
        raise Timeout(f"no answer within request_timeout_s={settings.request_timeout_s}")
    body = work.result()  # an engine failure (500) or a refusal (429, 503) raises its ApiError here
    metrics.total_seconds.observe(time.perf_counter() - started)
    return Response(body, media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
