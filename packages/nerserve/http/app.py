"""The HTTP routes of API.md, as one front-end worker serves them (FastAPI, run by uvicorn in worker.py).

A request goes: validation -> tokenization -> the engine process (engine_link.py) -> aggregation ->
encoding, each stage timed in /metrics. Every failure is an ApiError, turned into its status and
headers in one place (responses.py). There is no /docs: Swagger UI loads its assets from a CDN, which
an air-gapped deployment cannot reach; /openapi.json describes the API."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import Settings
from ..errors import ApiError, Timeout
from ..metrics import Metrics, render
from ..schemas import PredictRequest, parse_hf_request, parse_request
from ..scores import TokenScores
from ..text.frontend import Encoded, Frontend, Prepared
from .body import read_json
from .engine_link import EngineLink
from .envelope import HF_ROUTES, PREDICT_ROUTES, Envelope
from .openapi import METRICS_MEDIA_TYPE, METRICS_RESPONSES, hf_openapi, predict_openapi
from .page import add_page
from .readiness import WorkerState
from .responses import error_response, json_response

log = logging.getLogger(__name__)
#: requests up to this size are tokenized on the event loop, and answers up to INLINE_TOKENS tokens made and
#: encoded there (the worker's one interpreter would run a thread's Python no sooner, and the hop costs);
#: larger ones go to a thread, so the loop keeps answering its other connections meanwhile (the tokenizer
#: and orjson release the interpreter lock while they work)
INLINE_TEXTS, INLINE_CHARS, INLINE_TOKENS = 256, 100_000, 8192
#: a request's items from its tokenized texts and their scores, where they are not /predict_tokens' own
Render = Callable[[Prepared, TokenScores], list[Any]]


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

    app.add_middleware(Envelope, api_key=settings.api_key, metrics=metrics)

    async def predict(request: Request) -> Response:
        try:
            frontend = state.ready()
            payload = await read_json(request, settings.max_body_bytes)
            parsed = parse_request(payload, settings.max_texts)
            return await _answer(request, state.link, frontend, parsed, settings, metrics)
        except ApiError as error:
            return error_response(error)

    def post_routes(paths: tuple[str, ...], endpoint: Callable[[Request], Any], openapi: dict[str, Any]) -> None:
        """`endpoint` at each of `paths` (its aliases), each described by `openapi`."""
        for path in paths:
            app.add_api_route(
                path,
                endpoint,
                methods=["POST"],
                name=f"{endpoint.__name__}{path}",
                response_class=Response,
                openapi_extra=openapi,
            )

    post_routes(PREDICT_ROUTES, predict, predict_openapi())

    async def hf_predict(request: Request) -> Response:
        """The Hugging Face token-classification API (what `InferenceClient(model=URL)` posts to `/`): the
        same path as /predict_tokens, answered in the pipeline's items; one text, one list."""
        try:
            frontend = state.ready()
            payload = await read_json(request, settings.max_body_bytes)
            parsed = parse_hf_request(payload, settings.max_texts)
            ignore, single = parsed.ignore_labels, isinstance(parsed.inputs, str)

            def render(prepared: Prepared, scores: TokenScores) -> list[Any]:
                items = frontend.hf_answer(prepared, ignore, scores)
                return items[0] if single else items

            return await _answer(
                request,
                state.link,
                frontend,
                parsed.predict_request(),
                settings,
                metrics,
                stride=parsed.parameters.stride,
                render=render,
            )
        except ApiError as error:
            return error_response(error)

    post_routes(HF_ROUTES, hf_predict, hf_openapi())

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

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def prometheus() -> Response:
        return Response(render(), media_type=METRICS_MEDIA_TYPE)

    add_page(app)
    return app


async def _answer(
    request: Request,
    link: EngineLink,
    frontend: Frontend,
    parsed: PredictRequest,
    settings: Settings,
    metrics: Metrics,
    stride: int | None = None,
    render: Render | None = None,
) -> Response:
    """Tokenize (refused past max_request_tokens), score on the engine (bounded by the timeout,
    abandoned if the client goes away), aggregate, encode. Large requests are tokenized, and large
    answers made and encoded, in a thread, so this worker's event loop keeps answering its other
    connections meanwhile; a request given up sets `given_up`, which that thread reads between
    bounded pieces of its work, so nothing keeps working for a request that has had its 504.
    `stride`: over-long texts' windows overlap by it; `render`: the answer's items in another shape
    than /predict_tokens' (the Hugging Face route's, made whole: its texts are cut to the model's
    length, or its entities are few)."""
    started = time.perf_counter()
    texts = parsed.texts()
    inline = len(texts) <= INLINE_TEXTS and sum(len(text) for text in texts) <= INLINE_CHARS
    given_up = threading.Event()

    async def respond() -> bytes:
        limit = settings.max_request_tokens
        if inline:
            prepared = frontend.prepare(parsed, limit, None, stride)
        else:
            prepared = await asyncio.to_thread(frontend.prepare, parsed, limit, given_up.is_set, stride)
        tokenized = time.perf_counter()
        metrics.stage("tokenization", tokenized - started)
        scores = await link.score(prepared.sequences, prepared.keep_logits)
        if render is not None:
            encoded = await _rendered(render, prepared, scores, prepared.tokens > INLINE_TOKENS)
            body = encoded.body
            metrics.stage("aggregation", encoded.aggregation_s)
            metrics.stage("encoding", encoded.encoding_s)
        elif prepared.tokens <= INLINE_TOKENS:
            scored = time.perf_counter()
            items = frontend.answer(prepared, scores)
            aggregated = time.perf_counter()
            body = orjson.dumps(items)
            metrics.stage("aggregation", aggregated - scored)
            metrics.stage("encoding", time.perf_counter() - aggregated)
        else:
            encoded = await asyncio.to_thread(frontend.encode, prepared, scores, given_up.is_set)
            body = encoded.body
            metrics.stage("aggregation", encoded.aggregation_s)
            metrics.stage("encoding", encoded.encoding_s)
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
        given_up.set()  # a thread working for it stops at its next check
        work.cancel()  # the engine drops what it has not run; the arena block is kept until it says so
        if gone in done:
            return Response(status_code=499)
        raise Timeout(f"no answer within request_timeout_s={settings.request_timeout_s}")
    body = work.result()  # an engine failure (500) or a refusal (429, 503) raises its ApiError here
    metrics.total_seconds.observe(time.perf_counter() - started)
    return Response(body, media_type="application/json")


async def _rendered(render: Render, prepared: Prepared, scores: TokenScores, in_thread: bool) -> Encoded:
    """`render`'s items as JSON, timed; made in a thread when `in_thread`."""

    def make() -> Encoded:
        begun = time.perf_counter()
        items = render(prepared, scores)
        made = time.perf_counter()
        return Encoded(orjson.dumps(items), made - begun, time.perf_counter() - made)

    return await asyncio.to_thread(make) if in_thread else make()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
