"""Reading a request's body: the JSON a predict route needs, within the byte limit, and the rest of a
refused request's body, so that clients which send their whole body before reading (Python's urllib,
requests) read the 413/401 instead of a connection reset. A client that goes away before its body is
whole is a Cancelled request (499 in the log and /metrics), not a server error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import Request
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from ..errors import BadRequest, Cancelled, PayloadTooLarge
from ..schemas import echo

#: a refused request's body is read and dropped up to this many bytes before the answer
DRAIN_BYTES = 64 << 20

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing a wrong content type (400), too many bytes (413), bad UTF-8 or JSON (400)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if not (content_type.endswith("/json") or content_type.endswith("+json")):
        raise BadRequest(f"content-type must be application/json, not {echo(content_type)}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise PayloadTooLarge(f"body of {declared[:20]} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    except ClientDisconnect:
        raise Cancelled(f"the client went away after {len(body)} bytes of its body") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"body is not valid JSON (UTF-8): {error}") from None


async def drain(receive: Receive, done: Callable[[], bool], headers: Headers) -> bool:
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
