"""The API's error kinds: each maps to one HTTP status and one `error_type` (API.md, Errors)."""

from __future__ import annotations


class ApiError(Exception):
    """An answer the client gets as `{"error": message, "error_type": kind}` with `status`."""

    status = 500
    kind = "Backend"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.kind}


class BadRequest(ApiError):
    """Not JSON, invalid UTF-8, wrong content type."""

    status, kind = 400, "Validation"


class Unauthorized(ApiError):
    """An API key is configured and the request's is missing or wrong."""

    status, kind = 401, "Unauthorized"


class PayloadTooLarge(ApiError):
    """The body or the number of texts is over its configured limit."""

    status, kind = 413, "Validation"


class Invalid(ApiError):
    """A well-formed JSON body that breaks the request schema."""

    status, kind = 422, "Validation"


class Empty(Invalid):
    """`inputs` is an empty list: nothing to run."""

    kind = "Empty"


class Overloaded(ApiError):
    """The queue is full; nothing of the request was started, so retrying is safe."""

    status, kind = 429, "Overloaded"


class Unhealthy(ApiError):
    """Not ready yet (loading, warming up) or draining for shutdown."""

    status, kind = 503, "Unhealthy"


class Timeout(ApiError):
    """The request outlived request_timeout_s; the scheduler skips its remaining work."""

    status, kind = 504, "Timeout"


class Cancelled(ApiError):
    """The request was given up (its client went away or it timed out) before the engine finished it."""

    status, kind = 499, "Cancelled"


class Backend(ApiError):
    """The engine failed on a batch holding this request's texts; the server goes on."""

    status, kind = 500, "Backend"
