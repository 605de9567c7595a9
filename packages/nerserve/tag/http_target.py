"""The HTTP target: POST URL/predict_tokens to a running server or a Baseten deployment.

A light client (httpx, orjson; neither torch nor transformers). Requests arrive packed by the
runner; as many are kept in flight as raise the rate of answers (concurrency.py: it climbs while
answers come faster, halves on 429, 503, 504 and timeouts). Behind one URL any number of replicas
share the load, as Baseten spreads it.

What an answer means for the rows:
- 200: one answer per text.
- 400, 413, 422 (any 4xx but 401/403/404/405, 408 and 429): the request's content is refused. A
  packed request is sent again one text a time, so only the text at fault gets the row error (`refused`).
- 500: an engine failure. A packed request is sent again one text a time; a text that alone gets it
  TEXT_RETRIES + 1 times is that row's error (`failed`), the summary says how many.
- 429, 503, 504, any other 5xx, 408, a timeout, a lost connection: the target's state, not the rows'.
  Waited for (its `Retry-After`, else an exponential back-off) and sent again, up to `max_retries`
  times; a packed request that got 504 goes again as two halves (a request too large to finish within
  the server's timeout gets smaller). Past the retries the target is unreachable: the job ends with
  nothing of those rows written, so a rerun sends them again. Never a row's error.
- 401, 403, 404, 405: every request would get the same; the job ends at once."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from .concurrency import AdaptiveLimit
from .rows import FAILED, MODEL_KEYS, REFUSED, Outcome, RequestOptions, Unreachable, row_error

#: statuses that say "this client is wrong" (key, URL): every request would get them, so the job stops
FATAL = {401: "the API key was refused", 403: "the API key was refused", 404: "no such route", 405: "no such route"}
#: a text that alone gets a 500 this many times more is that row's error (the engine fails on it)
TEXT_RETRIES = 2


def about_content(status: int) -> bool:
    """A 4xx that concerns the request's texts (FATAL ones and 408/429 are not about its content)."""
    return 400 <= status < 500 and status not in FATAL and status not in (408, 429)


@dataclasses.dataclass
class Limits:
    """Concurrency and retry bounds of the HTTP client."""

    start: int = 4
    ceiling: int = 256
    max_retries: int = 8
    timeout_s: float = 120.0
    backoff_cap_s: float = 10.0


def predict_url(url: str) -> str:
    """URL is a server root or a deployment's base URL (…/environments/production/sync)."""
    return url.rstrip("/") + "/predict_tokens"


def retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (delta-seconds or an HTTP date), when it sent one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _problem(response: httpx.Response) -> str:
    """`HTTP 413 Validation: inputs: ...` from the API's error body (or the start of any other body)."""
    try:
        body = orjson.loads(response.content)
        detail = f"{body['error_type']}: {body['error']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        detail = response.text[:200].strip() or response.reason_phrase
    return f"HTTP {response.status_code} {detail}"


class HttpTarget:
    """Answers texts by POST /predict_tokens, retried and paced as the module says."""

    def __init__(self, url: str, options: RequestOptions, api_key: str | None, limits: Limits) -> None:
        self.url = url.rstrip("/")
        self.endpoint = predict_url(url)
        self.options = options
        self.limits = limits
        self.concurrency = AdaptiveLimit(limits.start, limits.ceiling)
        self.retries: Counter[str] = Counter()
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Api-Key {api_key}"
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(limits.timeout_s, connect=min(10.0, limits.timeout_s)),
            # idle connections are dropped before a server's own keep-alive timeout (nerserve's keep_alive_s
            # and uvicorn's: 5 s), so none is reused just as the server closes it
            limits=httpx.Limits(
                max_connections=limits.ceiling, max_keepalive_connections=limits.ceiling, keepalive_expiry=2.0
            ),
        )

    @property
    def window(self) -> int:
        """Requests the runner keeps prepared: twice the limit, so the limit, not the runner, paces them
        (and memory follows what is in flight)."""
        return 2 * self.concurrency.limit + 2

    async def model(self) -> dict[str, Any]:
        """What identifies the model for the resume fingerprint: the server's /info (model, checkpoint
        hash, engine, precision, window overlap), or the URL where the deployment does not route /info
        (404, 405). A server still loading (503), overloaded or unreachable is waited for like any
        request, and past the retries the job ends before anything is written: the fingerprint never
        depends on when the job started relative to the model's load."""
        info = await self.info()
        return {"url": self.url} if info is None else {key: info.get(key) for key in MODEL_KEYS}

    async def info(self) -> dict[str, Any] | None:
        """The server's whole /info (its labels too), or None where the deployment does not route it;
        waited for as `model` says."""
        url = self.url + "/info"
        attempt = 0
        while True:
            response = await self._send("GET", url, None)
            status = response.status_code
            if status == 200:
                try:
                    info = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    info = None
                if not isinstance(info, dict):
                    raise Unreachable(f"{url} answered 200 with something other than a JSON object")
                return info
            if status in (401, 403):  # every request would be refused: say so before anything is written
                raise Unreachable(f"{url}: {FATAL[status]} ({_problem(response)})")
            if status in (404, 405) or about_content(status):
                return None
            attempt += 1
            await self._back_off(str(status), attempt, retry_after(response), f"{url}: {_problem(response)}")

    async def answer(self, texts: list[str], attempt: int = 0) -> list[Outcome]:
        """One outcome per text, in order (as the module says); raises Unreachable when the target cannot
        be reached. `attempt`: retries already spent on these texts (a half of a request inherits them,
        so a run of 504s ends after `max_retries` whatever the halving)."""
        body = orjson.dumps(self.options.payload(texts))
        while True:
            response = await self._send("POST", self.endpoint, body)
            status = response.status_code
            if status == 200:
                answers = orjson.loads(response.content)
                if not isinstance(answers, list) or len(answers) != len(texts):
                    raise Unreachable(f"{self.endpoint} answered 200 with something other than one list per text")
                return answers
            if status in FATAL:
                raise Unreachable(f"{self.endpoint}: {FATAL[status]} ({_problem(response)})")
            if (about_content(status) or status == 500) and len(texts) > 1:
                alone = await asyncio.gather(*(self.answer([text]) for text in texts))
                return [outcomes[0] for outcomes in alone]
            if about_content(status):
                return [row_error(REFUSED, _problem(response))]
            attempt += 1
            if status == 500 and attempt > TEXT_RETRIES:
                return [row_error(FAILED, _problem(response))]
            await self._back_off(str(status), attempt, retry_after(response), f"{self.endpoint}: {_problem(response)}")
            if status == 504 and len(texts) > 1:
                half = len(texts) // 2
                first, second = await asyncio.gather(
                    self.answer(texts[:half], attempt), self.answer(texts[half:], attempt)
                )
                return first + second

    async def _send(self, method: str, url: str, body: bytes | None) -> httpx.Response:
        """One request inside the concurrency limit (a 200 counts towards its rate); connection failures
        and timeouts retried here."""
        attempt = 0
        while True:
            await self.concurrency.acquire()
            answered = None
            try:
                response = await self.client.request(method, url, content=body)
                answered = len(body or b"") if response.status_code == 200 else None
                return response
            except httpx.TimeoutException as error:
                reason, problem = "timeout", f"no answer within {self.limits.timeout_s:g} s ({type(error).__name__})"
            except httpx.TransportError as error:
                reason, problem = "connection", f"{type(error).__name__}: {error}"
            finally:
                await self.concurrency.release(answered)
            attempt += 1
            await self._back_off(reason, attempt, None, f"{url}: {problem}")

    async def _back_off(self, reason: str, attempt: int, wait: float | None, problem: str) -> None:
        """Count the retry, cut the limit, wait; or, past the retries, give up on the target (`problem`
        names the URL and what went wrong)."""
        if attempt > self.limits.max_retries:
            raise Unreachable(f"{problem}, still after {self.limits.max_retries} retries")
        self.retries[reason] += 1
        self.concurrency.cut()
        if wait is None:
            wait = min(self.limits.backoff_cap_s, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
        await asyncio.sleep(wait)

    async def close(self) -> None:
        await self.client.aclose()
