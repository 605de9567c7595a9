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
    status, kind = 401, "Unauthorized"


class PayloadTooLarge(ApiError):
    status, kind = 413, "Validation"


class Invalid(ApiError):
    """A well-formed JSON body that breaks the request schema."""

    status, kind = 422, "Validation"


class Empty(Invalid):
    kind = "Empty"


class Overloaded(ApiError):
    status, kind = 429, "Overloaded"


class Unhealthy(ApiError):
    status, kind = 503, "Unhealthy"


class Timeout(ApiError):
    status, kind = 504, "Timeout"


class Backend(ApiError):
    status, kind = 500, "Backend"
