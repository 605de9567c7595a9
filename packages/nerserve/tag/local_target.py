"""The engine in this process, for `nerserve tag` without `--url` or `--ray`, and inside each Ray actor.

`LocalEngine` is the one place that builds the service and calls it: the settings come from
config.yaml and NERSERVE_* as for the server, with `--checkpoint` and `--engine` over them. Importing
this module is light; the model stack is imported when an engine is made."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .rows import FAILED, MODEL_KEYS, REFUSED, Outcome, RequestOptions, Unreachable, row_error

#: the wait after a full queue (doubling up to the cap): the other request in the queue is being answered
QUEUE_WAIT_S = (0.05, 1.0)


def checkpoint_setting(checkpoint: str | None) -> str | None:
    """A local folder as an absolute path (a Ray actor runs in another folder); a hub id as given."""
    if checkpoint and Path(checkpoint).exists():
        return str(Path(checkpoint).resolve())
    return checkpoint


class LocalEngine:
    """The service (tokenizer, engine, scheduler) in this process, answering lists of texts."""

    def __init__(self, checkpoint: str | None, engine: str | None, options: RequestOptions) -> None:
        from ..config import load_settings
        from ..service import InProcessService

        settings = load_settings({"checkpoint": checkpoint_setting(checkpoint), "engine": engine})
        self.options = options
        self.max_texts = settings.max_texts
        self.service = InProcessService(settings)
        self.service.warm_up()  # the engine's lazy start-up is paid before the job's clock starts, as a server does
        self.retries: Counter[str] = Counter()

    def answer(self, texts: list[str]) -> list[Outcome]:
        """One outcome per text; a request the service refuses for its content is answered again one
        text a time, so only the text at fault gets the row error. A full queue (the other request in
        flight holds it) is waited out, never a row's error; a service shutting down ends the job."""
        from ..errors import ApiError, Overloaded, Unhealthy
        from ..http.responses import status_of
        from ..schemas import parse_request

        wait = QUEUE_WAIT_S[0]
        while True:
            try:
                request = parse_request(self.options.payload(texts), self.max_texts)
                answers: list[Outcome] = [*self.service.predict(request)]
                return answers
            except Overloaded:
                self.retries["queue full"] += 1
                time.sleep(wait)
                wait = min(QUEUE_WAIT_S[1], 2 * wait)
            except Unhealthy as error:
                raise Unreachable(f"the engine in this process: {error.message}") from None
            except ApiError as error:
                if len(texts) > 1:
                    return [outcome for text in texts for outcome in self.answer([text])]
                kind = REFUSED if 400 <= status_of(error) < 500 else FAILED
                return [row_error(kind, f"{error.kind}: {error.message}")]

    def model(self) -> dict[str, Any]:
        info = self.info()
        return {key: info.get(key) for key in MODEL_KEYS}

    def info(self) -> dict[str, Any]:
        """What the server's /info would show (its labels too)."""
        return self.service.info()

    def close(self) -> None:
        self.service.close()


class LocalTarget:
    """The runner's view of a LocalEngine: requests on threads, so tokenization and aggregation of one
    overlap the engine's work on another (the scheduler batches them together)."""

    def __init__(self, engine: LocalEngine, threads: int = 2) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nerserve-tag")
        self.window = 2 * threads
        self.retries = engine.retries

    async def model(self) -> dict[str, Any]:
        return self.engine.model()

    async def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def answer(self, texts: list[str]) -> list[Outcome]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.answer, texts)

    async def close(self) -> None:
        self.pool.shutdown()
        self.engine.close()
