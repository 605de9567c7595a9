"""What every request gets around its route: a request id (`x-request-id` honoured, bounded and
cleaned, or made), the API key check, `x-total-time-ms`, the request counter, one JSON log line, the
reading of a refused request's body (body.drain), and the answer to an exception no route expected: the
client gets a stable message naming the request id (an exception's text may hold paths, settings or
input), the log gets the traceback beside the same id. Plain ASGI rather than `@app.middleware("http")`,
whose task group and body streams cost more than the rest of a small request."""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.datastructures import Headers

from ..errors import Internal, TooManyConnections, Unauthorized
from ..metrics import Metrics
from .body import Message, Receive, drain
from .connections import OVER_CAPACITY
from .responses import error_response

log = logging.getLogger(__name__)
PREDICT_ROUTES = ("/predict_tokens", "/predict", "/v1/models/model:predict")
#: the Hugging Face token-classification API: the root, where InferenceClient(model=URL) posts, and a path
#: of its own for a proxy that keeps the root (Truss's nginx rewrites `/` to the liveness probe on Baseten)
HF_ROUTES = ("/", "/hf")
#: a client's request id is kept to these characters and this length: it goes into a header and the log
REQUEST_ID_MAX = 128
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._:/+=@-]")

Scope = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


def request_id(supplied: str | None) -> str:
    """The client's `x-request-id` cleaned (letters, digits and `._:/+=@-`) and bounded, else a new one."""
    cleaned = _NOT_IN_ID.sub("", supplied or "")[:REQUEST_ID_MAX]
    return cleaned or uuid.uuid4().hex


class Envelope:
    """The ASGI wrapper around the app (module docstring)."""

    #: read without a key (GET and HEAD only: POST / is the Hugging Face route): the page is public, its
    #: fetches send the key
    OPEN_PATHS = ("/health", "/openapi.json", "/ui", "/")
    ROUTES = (*PREDICT_ROUTES, *HF_ROUTES, "/health", "/info", "/metrics")
    FREE_PATHS = ("/health", "/info", "/metrics")  # served even to a connection past max_connections

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, headers: Headers) -> bool:
        """The key from `Authorization: Bearer <key>`, Baseten's `Authorization: Api-Key <key>`, or an
        `Api-Key` header, compared in constant time."""
        assert self.api_key is not None
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        supplied = credential.strip() if scheme.lower() in ("bearer", "api-key") else headers.get("api-key", "")
        return hmac.compare_digest(supplied.encode("utf-8", "replace"), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = Headers(scope=scope)
        rid = request_id(headers.get("x-request-id"))
        status = 500
        body_read = responded = False

        async def tracked_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                extra = [(b"x-request-id", rid.encode())]
                if not body_read and not await drain(tracked_receive, lambda: body_read, headers):
                    extra.append((b"connection", b"close"))  # past the bound (or 100-continue): close cleanly
                timing = f"{(time.perf_counter() - started) * 1000:.2f}"
                extra.append((b"x-total-time-ms", timing.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            open_path = scope["path"] in self.OPEN_PATHS and scope["method"] in ("GET", "HEAD")
            if scope.get(OVER_CAPACITY) and scope["path"] not in self.FREE_PATHS:
                busy = TooManyConnections("this worker is at its max_connections; retry soon")
                await error_response(busy)(scope, tracked_receive, send_with_headers)
            elif self.api_key and not open_path and not self._authorized(headers):
                refusal = error_response(
                    Unauthorized("missing or wrong API key (Authorization: Bearer <key> or Api-Key <key>)")
                )
                await refusal(scope, tracked_receive, send_with_headers)
            else:
                await self.app(scope, tracked_receive, send_with_headers)
        except Exception:
            log.exception("unexpected error; request id %s", rid)
            if responded:  # too late for an answer: the server closes the connection
                raise
            answer = error_response(Internal(f"internal error; request id {rid}"))
            await answer(scope, tracked_receive, send_with_headers)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        if log.isEnabledFor(logging.INFO):
            line = {
                "request_id": rid,
                "worker": os.getpid(),
                "method": scope["method"],
                "path": route,
                "status": status,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            }
            log.info("%s", orjson.dumps(line).decode())
