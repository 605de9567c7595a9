"""The API's error kinds, as the core raises them: a message and an `error_type`, nothing of HTTP.
`http/responses.py` is the one place that maps each kind to its status and headers (API.md, Errors),
as text-embeddings-inference maps its ErrorType to a StatusCode in one `From` impl."""

from __future__ import annotations


class ApiError(Exception):
    """An answer the client gets as `{"error": message, "error_type": kind}`."""

    kind = "Backend"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.kind}


class BadRequest(ApiError):
    """Not JSON, invalid UTF-8, wrong content type."""

    kind = "Validation"


class Unauthorized(ApiError):
    """An API key is configured and the request's is missing or wrong."""

    kind = "Unauthorized"


class PayloadTooLarge(ApiError):
    """The body, the number of texts or the request's tokens is over its configured limit."""

    kind = "Validation"


class HeaderTooLarge(ApiError):
    """The request line and headers are over `max_header_bytes` (http/connections.py)."""

    kind = "Validation"


class SlowClient(ApiError):
    """The client did not send its request's head or body in time (http/connections.py)."""

    kind = "Timeout"


class Invalid(ApiError):
    """A well-formed JSON body that breaks the request schema."""

    kind = "Validation"


class Empty(Invalid):
    """`inputs` is an empty list: nothing to run."""

    kind = "Empty"


class Overloaded(ApiError):
    """The queue is full; nothing of the request was started, so retrying is safe."""

    kind = "Overloaded"


class Busy(ApiError):
    """This worker's transport space (its arena) is full of requests in flight; nothing of the request
    was started, so retrying, soon or at another worker, is safe."""

    kind = "Overloaded"


class TooManyConnections(ApiError):
    """This worker holds `max_connections` busy connections; only the free routes (/health, /info,
    /metrics) are served to one more, so a probe always gets through. Retrying soon is safe."""

    kind = "Overloaded"


class Unhealthy(ApiError):
    """Not ready yet (loading, warming up) or draining for shutdown."""

    kind = "Unhealthy"


class Timeout(ApiError):
    """The request outlived request_timeout_s; the scheduler skips its remaining work."""

    kind = "Timeout"


class Cancelled(ApiError):
    """The request was given up (its client went away or it timed out) before the engine finished it."""

    kind = "Cancelled"


class EngineFailure(ApiError):
    """The engine failed on a batch holding this request's texts; the server goes on."""

    kind = "Backend"


class Internal(ApiError):
    """An exception nothing expected: the client is told only the request id, the log gets the cause."""

    kind = "Backend"
