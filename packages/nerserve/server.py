"""The HTTP server: API.md's routes over the Truss Model, run by uvicorn (`python -m nerserve.server`).

The body is read and decoded here rather than by FastAPI's body parameter, so every failure gets
API.md's status (400 for bytes that are not JSON, 413 past the byte limit, 422 for schema) and
shape. The model loads in a background thread: /health answers 503 until it has loaded and
answered a warm-up request, and the port is open meanwhile (Truss and Kubernetes probe it)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .config import Settings
from .errors import ApiError, Backend, BadRequest, PayloadTooLarge, Timeout, Unauthorized, Unhealthy
from .metrics import Metrics
from .schemas import PredictRequest, TokenResult, parse_request
from .ui import add_page

log = logging.getLogger("nerserve")
PREDICT_ROUTES = ("/predict_tokens", "/predict", "/v1/models/model:predict")
INLINE_TEXTS, INLINE_CHARS = 4, 2000  # requests this small skip the worker-thread hops (~0.1 ms of work)


def load_model_class(root: Path):
    """The Truss Model class from `<root>/model/model.py`, imported by path as Truss does."""
    spec = importlib.util.spec_from_file_location("truss_model", root / "model" / "model.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {root / 'model' / 'model.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def read_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(error: ApiError) -> Response:
    return _json(error.body(), error.status, error.headers)


class Envelope:
    """Request id (`x-request-id` honoured or made), API key, `x-total-time-ms`, the request counter and
    one structured log line per request. Plain ASGI rather than `@app.middleware("http")`, whose
    per-request task group and body streams cost more than the rest of a small request."""

    OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/ui", "/")  # the page is public; its fetches send the key
    ROUTES = PREDICT_ROUTES + ("/health", "/info", "/metrics")

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, headers: Headers) -> bool:
        supplied = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("api-key", "")
        return supplied == self.api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        status = 500

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                timing = f"{(time.perf_counter() - started) * 1000:.2f}"
                extra = [
                    (b"x-request-id", request_id.encode("latin-1", "replace")),
                    (b"x-total-time-ms", timing.encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if self.api_key and scope["path"] not in self.OPEN_PATHS and not self._authorized(headers):
            refusal = _error(Unauthorized("missing or wrong API key (Authorization: Bearer <key> or Api-Key)"))
            await refusal(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)
        elapsed_ms = (time.perf_counter() - started) * 1000
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        log.info(
            '{"request_id":"%s","method":"%s","path":"%s","status":%d,"ms":%.2f}',
            request_id,
            scope["method"],
            route,
            status,
            elapsed_ms,
        )


class State:
    """The loaded model, or why it is not loaded yet."""

    def __init__(self) -> None:
        self.model = None
        self.failure: str | None = None
        self.closing = False


def create_app(config: dict, root: Path, secrets: dict | None = None) -> FastAPI:
    """The ASGI app over the Model in `root/model/model.py`, configured by `config` (config.yaml)."""
    settings = Settings.load(config.get("model_metadata"))
    metrics = Metrics()
    state = State()

    def load() -> None:
        try:
            model = load_model_class(root)(config=config, data_dir=root / "data", secrets=secrets or {})
            model.load(observe_batch=metrics.observe_batch)
            state.model = model
            log.info("ready: %s", orjson.dumps(model.service.info()).decode())
        except Exception as error:  # keep serving /health (503 with the reason) rather than die silently
            state.failure = f"{type(error).__name__}: {error}"
            log.exception("model failed to load")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="nerserve-load", daemon=True).start()
        yield
        state.closing = True
        if state.model is not None:
            await asyncio.to_thread(state.model.service.close)  # drain what was accepted
        log.info("shutdown complete: queue drained")

    app = FastAPI(
        title="nerserve",
        version=__version__,
        lifespan=lifespan,
        description="BEI-Bert-compatible token classification with transformers-pipeline-exact answers.",
    )
    app.state.begin_drain = lambda: setattr(state, "closing", True)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """Unknown routes and methods answer in API.md's error shape too."""
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "Validation")
        return _json({"error": str(error.detail), "error_type": kind}, error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error")
        return _error(Backend(f"{type(error).__name__}: {error}"))

    def ready_service():
        if state.closing:
            raise Unhealthy("the server is shutting down")
        if state.model is None:
            raise Unhealthy(f"model failed to load: {state.failure}" if state.failure else "model is loading")
        return state.model.service

    app.add_middleware(Envelope, api_key=settings.api_key, metrics=metrics)

    async def predict(request: Request) -> Response:
        try:
            service = ready_service()
            payload = await _read_json(request, settings.max_body_bytes)
            parsed = parse_request(payload, settings.max_texts)
            return await _answer(request, service, parsed, settings, metrics)
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

    @app.get("/health")
    async def health() -> Response:
        try:
            ready_service()
        except ApiError as error:
            return _error(error)
        return _json({"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        try:
            return _json(ready_service().info())
        except ApiError as error:
            return _error(error)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state.model is not None:
            metrics.queue_depth.set(state.model.service.scheduler.depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

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


async def _answer(request: Request, service, parsed: PredictRequest, settings: Settings, metrics: Metrics) -> Response:
    """Tokenize in a worker thread, wait for the engine (bounded by the timeout, abandoned if the client
    goes away), aggregate in a worker thread, encode with orjson."""
    started = time.perf_counter()
    texts = parsed.texts()
    small = len(texts) <= INLINE_TEXTS and sum(len(text) for text in texts) <= INLINE_CHARS
    # A small request costs less than a thread hop: tokenize and aggregate it on the event loop.
    pending = service.submit(parsed) if small else await asyncio.to_thread(service.submit, parsed)
    waiter = asyncio.ensure_future(asyncio.wrap_future(pending.future))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {waiter, gone}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
    if waiter not in done:
        pending.future.cancel()  # the scheduler skips its remaining sequences
        waiter.cancel()
        if gone in done:
            return Response(status_code=499)
        raise Timeout(f"no answer within request_timeout_s={settings.request_timeout_s}")
    logits = waiter.result()
    metrics.queue_seconds.observe(time.perf_counter() - started)
    try:
        items = service.finish(pending, logits) if small else await asyncio.to_thread(service.finish, pending, logits)
    except Exception as error:
        raise Backend(f"aggregation failed: {type(error).__name__}: {error}") from error
    metrics.texts.inc(len(pending.texts))
    metrics.tokens.inc(pending.tokens)
    metrics.total_seconds.observe(time.perf_counter() - started)
    return Response(orjson.dumps(items), media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _mounted_secrets(folder: Path = Path("/secrets")) -> dict[str, str]:
    """Baseten mounts each secret as a file under /secrets (a docker_server gets no Truss secrets object)."""
    if not folder.is_dir():
        return {}
    return {path.name: path.read_text().strip() for path in folder.iterdir() if path.is_file()}


def main() -> None:
    """Serve config.yaml's model on PORT (uvicorn, one process: the engine wants one owner)."""
    import uvicorn

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    config_path = Path(os.environ.get("NERSERVE_CONFIG", "config.yaml")).resolve()
    config = read_config(config_path)
    settings = Settings.load(config.get("model_metadata"))
    app = create_app(config, config_path.parent, secrets=_mounted_secrets())
    server = draining_server(
        uvicorn.Config(
            app,
            host=os.environ.get("HOST", "0.0.0.0"),
            port=settings.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
        ),
        on_drain=app.state.begin_drain,
        grace_s=settings.shutdown_grace_s,
    )
    server.run()


def draining_server(config, on_drain, grace_s: float):
    """uvicorn's Server with a drain phase: the first SIGTERM/SIGINT flips /health and new requests to 503
    (load balancers stop routing, clients get an answer instead of a reset), keeps the port open for
    `grace_s` while accepted requests finish, then shuts down as uvicorn does; a second signal is at once."""
    import uvicorn

    class _Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining or grace_s <= 0:
                return super().handle_exit(sig, frame)
            self.draining = True
            on_drain()
            log.info("draining for %.1fs before shutdown", grace_s)
            threading.Timer(grace_s, super().handle_exit, (sig, frame)).start()

    return _Server(config)


if __name__ == "__main__":
    main()
