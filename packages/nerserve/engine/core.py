"""The engine process's core: the checkpoint, the engine and the one scheduler in front of it.

It takes token sequences and hands back their scores; it knows nothing of requests, HTTP or
aggregation. The engine process feeds it from every worker's shared memory (engine/process.py), and
the in-process service feeds it from the Truss Model's thread (service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

import numpy as np

from .. import __version__
from ..checkpoint import Checkpoint, load_checkpoint
from ..config import Settings
from ..engines.base import Engine
from ..engines.selection import load_engine
from ..errors import ApiError
from ..export.startup import served_artefact
from ..scores import TokenScores
from ..text.frontend import Frontend, warm_up
from ..text.tokenization import TextTokenizer
from .scheduler import BatchObserver, Job, Scheduler

log = logging.getLogger(__name__)
#: settings and checkpoint -> the engine to serve with (its `max_num_tokens` set)
EngineLoader = Callable[[Settings, Checkpoint], Engine]


def load_served_engine(settings: Settings, checkpoint: Checkpoint) -> Engine:
    """The default loader: what is served is decided and made first (export/startup.py), then the
    chosen runtime loads it (engines/selection.py)."""
    return load_engine(settings, checkpoint, served_artefact(settings, checkpoint))


class EngineCore:
    """Checkpoint, engine and scheduler in this process; `submit` from any thread."""

    def __init__(
        self,
        settings: Settings,
        observe_batch: BatchObserver | None = None,
        observe_queue: Callable[[float], None] | None = None,
        engine_loader: EngineLoader | None = None,
    ) -> None:
        """`engine_loader` makes the engine (None: `load_served_engine`, the runtime the settings choose); the
        bench gives its own to measure everything but the model."""
        self.settings = settings
        self.checkpoint: Checkpoint = load_checkpoint(
            settings.checkpoint, settings.revision, settings.hf_token, settings.mounts
        )
        self.tokenizer = TextTokenizer(
            self.checkpoint.tokenizer, self.checkpoint.max_input_tokens, settings.window_stride
        )
        self.engine = (engine_loader or load_served_engine)(settings, self.checkpoint)
        self.scheduler = Scheduler(
            self.engine, settings.batch_wait_ms, settings.queue_size, observe_batch, observe_queue
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return self.checkpoint.labels

    def submit(self, job: Job) -> None:
        """Queue a job whose arrays are the caller's (shared memory in the engine process); raises,
        refusing it whole, when the queue is full or the core is closing."""
        self.scheduler.submit(job)

    def cancel(self, job: Job) -> None:
        self.scheduler.cancel(job)

    @property
    def depth(self) -> int:
        """Sequences waiting for the engine."""
        return self.scheduler.depth

    def score(self, sequences: list[np.ndarray], keep_logits: bool) -> Future[TokenScores]:
        """Queue `sequences`; the Future holds their scores, in order (cancelling it drops the work)."""
        out = TokenScores.empty(sum(len(s) for s in sequences), len(self.labels), keep_logits)
        future: Future[TokenScores] = Future()

        def done(error: ApiError | None) -> None:
            with contextlib.suppress(InvalidStateError):  # the caller cancelled it meanwhile
                if error is None:
                    future.set_result(out)
                else:
                    future.set_exception(error)

        def given_up(settled: Future[TokenScores]) -> None:
            if settled.cancelled():
                self.scheduler.cancel(job)

        job = Job(sequences, out, done)
        future.add_done_callback(given_up)
        self.scheduler.submit(job)
        return future

    async def _score_async(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        return await asyncio.wrap_future(self.score(sequences, keep_logits))

    def warm_up(self) -> None:
        """One real request through every step (text/frontend.py's warm_up) before anyone is told it is ready.
        It runs on a thread of its own with its own event loop, so a caller inside a running loop (`nerserve
        tag` in process, a host that loads the Truss Model from async code) can call it as well."""
        work = warm_up(Frontend(self.tokenizer, self.labels), self._score_async)
        with ThreadPoolExecutor(1, thread_name_prefix="nerserve-warm-up") as thread:
            thread.submit(asyncio.run, work).result()

    def info(self) -> dict:
        """What /info shows."""
        return {
            "model_id": self.checkpoint.name,
            "revision": self.settings.revision,
            "checkpoint_sha256": self.checkpoint.sha256,
            "labels": list(self.checkpoint.labels),
            "max_input_tokens": self.checkpoint.max_input_tokens,
            "engine": self.engine.name,
            "precision": self.engine.precision,
            "max_num_tokens": self.engine.max_num_tokens,
            "window_stride": self.tokenizer.window_stride,
            "max_texts": self.settings.max_texts,
            "max_body_bytes": self.settings.max_body_bytes,
            "max_request_tokens": self.settings.max_request_tokens,
            "version": __version__,
        }

    def close(self) -> None:
        """Finish queued work, then release the engine."""
        self.scheduler.close(drain=True)
        self.engine.close()
