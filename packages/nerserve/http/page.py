"""The page for people (`GET /ui`, and `GET /` redirecting to it): paste texts, pick a strategy, see the
entities highlighted. The page is one self-contained file, `ui.html` beside this module, read once at
import; it talks only to this server's own /info and /predict_tokens, with the key the person typed.

Its Content-Security-Policy allows exactly the page's own inline script and style (by their sha256,
so no 'unsafe-inline') and connections to its own origin only: nothing is fetched from another host,
and a text that somehow became markup could not run."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

PAGE = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")


def _inline_hashes(page: str, tag: str) -> str:
    """CSP source expressions for each inline `<tag>` block, hashed as browsers hash it (its exact UTF-8 text)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    if not blocks:
        raise ValueError(f"ui.html has no inline <{tag}>")
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def page_headers(page: str = PAGE) -> dict[str, str]:
    """Headers for the page: a CSP that forbids every other host, no sniffing, no referrer, no framing, and
    no caching (a redeployed server shows its new page at once)."""
    policy = (
        f"default-src 'none'; script-src {_inline_hashes(page, 'script')}; style-src {_inline_hashes(page, 'style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def add_page(app: FastAPI) -> None:
    """Register `GET /ui` and `GET /` on the app. Both stay out of /openapi.json, which describes the API for
    clients (and drives the schemathesis tests); the page is for people. Behind Truss's proxy `/` is rewritten
    to the liveness probe, so the redirect only serves a person who reaches the server directly."""
    body, headers = PAGE.encode("utf-8"), page_headers()

    @app.get("/ui", include_in_schema=False)
    async def ui() -> Response:
        return Response(body, media_type="text/html", headers=headers)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)
