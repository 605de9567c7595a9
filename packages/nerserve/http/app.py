"""The HTTP routes of API.md, as one front-end worker serves them (FastAPI, run by uvicorn in worker.py).

A request goes: validation -> tokenization -> the engine process (engine_link.py) -> aggregation ->
encoding, each stage timed in /metrics. Every failure is an ApiError, turned into its status and
headers in one place (responses.py). There is no /docs: Swagger UI loads its assets from a CDN, which
an air-gapped deployment cannot reach; /openapi.json describes the API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import Settings
from ..errors import ApiError, EngineFailure, Timeout
from ..metrics import Metrics, render
from ..schemas import PredictRequest, parse_request
from ..text.frontend import Frontend
from .body import read_json
from .engine_link import EngineLink
from .envelope import PREDICT_ROUTES, Envelope
from .openapi import predict_openapi
from .page import add_page
from .readiness import WorkerState
from .responses import error_response, json_response

log = logging.getLogger(__name__)
#: requests up to this size are tokenized and aggregated on the event loop (the worker's one interpreter would
#: run a thread's Python no sooner, and the hop costs); larger ones go to a thread, so the loop keeps answering
#: its other connections while the tokenizer (which releases the interpreter lock) works
INLINE_TEXTS, INLINE_CHARS = 256, 100_000


def create_app(settings: Settings, state: WorkerState, metrics: Metrics) -> FastAPI:
    """One worker's ASGI app."""
    app = FastAPI(
        title="nerserve",
        version=__version__,
        description="BEI-Bert-compatible token classification with transformers-pipeline-exact answers.",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """Unknown routes and methods answer in API.md's error shape too."""
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "Validation")
        return json_response({"error": str(error.detail), "error_type": kind}, error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(EngineFailure(f"{type(error).__name__}: {error}"))

    app.add_middleware(Envelope, api_key=settings.api_key, metrics=metrics)

    async def predict(request: Request) -> Response:
        try:
            frontend = state.ready()
            payload = await read_json(request, settings.max_body_bytes)
            parsed = parse_request(payload, settings.max_texts)
            return await _answer(request, state.link, frontend, parsed, settings, metrics)
        except ApiError as error:
            return error_response(error)

    for path in PREDICT_ROUTES:
        app.add_api_route(
            path,
            predict,
            methods=["POST"],
            name=f"predict{path}",
            response_class=Response,
            openapi_extra=predict_openapi(),
        )

    def when_ready(body: Callable[[], Any]) -> Response:
        """`body()` as JSON once this worker can serve, else 503 saying why."""
        try:
            state.ready()
        except ApiError as error:
            return error_response(error)
        return json_response(body())

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


async def _answer(
    request: Request,
    link: EngineLink,
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
        scores = await link.score(prepared.sequences, prepared.keep_logits)
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
