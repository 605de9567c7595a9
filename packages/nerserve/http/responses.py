"""The one place where the core's error kinds become HTTP: each kind's status and headers (API.md,
Errors), and the JSON responses every route answers with."""

from __future__ import annotations

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
    Internal,
    Invalid,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    Unauthorized,
    Unhealthy,
)

#: each kind's status (tests/test_architecture.py holds that every kind has one; `status_of` falls back to
#: the nearest listed base for a subclass made elsewhere)
STATUS: dict[type[ApiError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    Invalid: 422,
    Empty: 422,
    Overloaded: 429,
    Cancelled: 499,
    EngineFailure: 500,
    Internal: 500,
    ApiError: 500,
    Unhealthy: 503,
    Busy: 503,
    Timeout: 504,
}
#: headers a kind's answer carries: a full queue or arena tells the client when to come back
HEADERS: dict[type[ApiError], dict[str, str]] = {Overloaded: {"Retry-After": "1"}, Busy: {"Retry-After": "1"}}


def status_of(error: ApiError) -> int:
    return next(STATUS[kind] for kind in type(error).__mro__ if kind in STATUS)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    """`{"error": ..., "error_type": ...}` with the kind's status and headers."""
    return json_response(error.body(), status_of(error), HEADERS.get(type(error)))
