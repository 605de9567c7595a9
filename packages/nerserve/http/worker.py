"""A front-end worker process: HTTP, validation, tokenization, aggregation and encoding, on the listening
socket the supervisor shares with every worker (the kernel hands each connection to one of them).

It starts serving at once (/health says 503 "model is loading"), reaches the engine process in a
thread, gets its tokenizer from it, answers one warm-up request through the engine, and only then
reports healthy. SIGTERM (from the supervisor) drains it: 503 to new requests and /health for
`shutdown_grace_s` while the port stays open, then uvicorn's graceful shutdown finishes what was
accepted, within the server's `shutdown_timeout_s`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from ..config import Settings
from ..errors import Busy, Overloaded, Timeout
from ..lifecycle import become_child, settle_memory
from ..logs import configure
from ..metrics import Metrics
from ..text.frontend import Frontend, Score, warm_up
from ..transport import Setup
from .app import create_app
from .connections import ConnectionLimits, guarded_protocol
from .engine_link import EngineLink
from .readiness import WorkerState

log = logging.getLogger(__name__)
#: a warm-up refused for load is tried again after the first wait, doubling up to the second (seconds)
WARM_UP_RETRY_S = (0.05, 2.0)


def serve_worker(settings: Settings, sock: socket.socket, address: str, authkey: bytes) -> None:
    """Entry point of a worker process (spawned by the supervisor). It never imports torch or
    transformers (a rule test holds it). Its tokenizer runs on one thread: the workers are the
    parallelism (a thread pool per worker would fight the others)."""
    become_child()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    configure(settings.log_level, "worker")
    state = WorkerState(EngineLink(address, authkey, settings.arena_bytes))
    app = create_app(settings, state, Metrics())
    app.router.lifespan_context = _lifespan(state)
    graceful = max(int(settings.workers_stop_s - settings.shutdown_grace_s), 1)
    config = uvicorn.Config(
        app,
        http=guarded_protocol(ConnectionLimits.of(settings)),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful,
    )
    server = draining_server(
        config, on_drain=lambda: setattr(state, "closing", True), grace_s=settings.shutdown_grace_s
    )
    server.run(sockets=[sock])


def _lifespan(state: WorkerState) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def connect() -> None:
            try:
                setup = state.link.connect()
            except Exception as error:  # the engine process never came up: the supervisor ends the server
                loop.call_soon_threadsafe(setattr, state, "failure", f"engine process unreachable: {error}")
                return
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_warm_up(state, setup)))

        threading.Thread(target=connect, name="nerserve-connect", daemon=True).start()
        yield

    return lifespan


async def _warm_up(state: WorkerState, setup: Setup) -> None:
    """One request through this worker's whole path, through the engine process, before it says it is healthy."""
    state.link.start(asyncio.get_running_loop())
    frontend = Frontend(setup.tokenizer, setup.labels)
    try:
        await warm_until_served(frontend, state.link.score)
    except Exception as error:
        state.failure = f"warm-up request failed: {type(error).__name__}: {error}"
        log.error("%s", state.failure)
        return
    state.info, state.frontend = setup.info, frontend
    settle_memory()


async def warm_until_served(frontend: Frontend, score: Score) -> None:
    """The warm-up, tried again while the engine refuses it for load (its queue or this worker's arena
    full, or its batches slower than the request timeout): a worker that starts under load, such as one
    replacing a worker that died, would otherwise be unhealthy for ever. Waits double from
    WARM_UP_RETRY_S[0] to WARM_UP_RETRY_S[1]; any other failure is the worker's."""
    wait, longest = WARM_UP_RETRY_S
    while True:
        try:
            return await warm_up(frontend, score)
        except (Overloaded, Busy, Timeout) as refused:
            log.info("warm-up refused (%s); trying again in %.2f s", refused.message, wait)
        await asyncio.sleep(wait)
        wait = min(2 * wait, longest)


def draining_server(config: uvicorn.Config, on_drain: Callable[[], None], grace_s: float) -> uvicorn.Server:
    """uvicorn's Server with a drain phase: the first SIGTERM/SIGINT flips /health and new requests to 503
    (load balancers stop routing, clients get an answer instead of a reset), keeps the port open for
    `grace_s` while accepted requests finish, then shuts down as uvicorn does; a second signal is at once."""

    class _Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining or grace_s <= 0:
                return super().handle_exit(sig, frame)
            self.draining = True
            on_drain()
            log.info("draining for %.1fs before shutdown", grace_s)
            threading.Timer(grace_s, super().handle_exit, (sig, frame)).start()

    return _Server(config)
