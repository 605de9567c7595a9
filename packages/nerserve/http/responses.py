"""The one place where the core's error kinds become HTTP: each kind's status and headers (API.md,
Errors), and the JSON responses every route answers with."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from fastapi.responses import Response

from ..errors import (
    ApiError,
    BadRequest,
    Busy,
    Cancelled,
    Empty,
    EngineFailure,
    HeaderTooLarge,
    Internal,
    Invalid,
    Overloaded,
    PayloadTooLarge,
    SlowClient,
    Timeout,
    TooManyConnections,
    Unauthorized,
    Unhealthy,
)

#: each kind's status (tests/test_architecture.py holds that every kind has one; `status_of` falls back to
#: the nearest listed base for a subclass made elsewhere)
STATUS: dict[type[ApiError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    SlowClient: 408,
    PayloadTooLarge: 413,
    HeaderTooLarge: 431,
    Invalid: 422,
    Empty: 422,
    Overloaded: 429,
    Cancelled: 499,
    EngineFailure: 500,
    Internal: 500,
    ApiError: 500,
    Unhealthy: 503,
    Busy: 503,
    TooManyConnections: 503,
    Timeout: 504,
}
#: headers a kind's answer carries: a full queue or arena tells the client when to come back
HEADERS: dict[type[ApiError], dict[str, str]] = {
    Overloaded: {"Retry-After": "1"},
    Busy: {"Retry-After": "1"},
    TooManyConnections: {"Retry-After": "1", "Connection": "close"},
}


def status_of(error: ApiError) -> int:
    return next(STATUS[kind] for kind in type(error).__mro__ if kind in STATUS)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    """`{"error": ..., "error_type": ...}` with the kind's status and headers."""
    return json_response(error.body(), status_of(error), HEADERS.get(type(error)))


def raw_error_response(error: ApiError) -> bytes:
    """The same answer as bytes on the wire, closing the connection: for a refusal the connection
    itself makes (http/connections.py), before any app has the request."""
    body = orjson.dumps(error.body())
    status = status_of(error)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    head += [f"{name}: {value}" for name, value in HEADERS.get(type(error), {}).items() if name != "Connection"]
    head += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body
