"""The whole request path in one process: `Frontend` (tokenization, aggregation) around the engine and
its scheduler. The Truss Model's in-process predict and the tests use it; the engine process loads
one and serves the front-end workers' requests through its scheduler."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint
from .config import Settings
from .engines import load_engine
from .engines.base import Engine
from .errors import ApiError
from .frontend import WARMUP, Frontend, Prepared
from .scheduler import BatchObserver, Job, Scheduler
from .schemas import PredictRequest
from .scores import TokenScores
from .tokenization import TextTokenizer

log = logging.getLogger(__name__)
#: settings and checkpoint -> the engine to serve with (its `max_num_tokens` set)
EngineLoader = Callable[[Settings, Checkpoint], Engine]


def service_info(settings: Settings, checkpoint: Checkpoint, tokenizer: TextTokenizer, engine: Engine) -> dict:
    """What /info shows."""
    return {
        "model_id": checkpoint.name,
        "revision": settings.revision,
        "checkpoint_sha256": checkpoint.sha256,
        "labels": list(checkpoint.labels),
        "max_input_tokens": checkpoint.max_input_tokens,
        "engine": engine.name,
        "precision": engine.precision,
        "max_num_tokens": engine.max_num_tokens,
        "window_stride": tokenizer.window_stride,
        "max_texts": settings.max_texts,
        "max_body_bytes": settings.max_body_bytes,
        "version": __version__,
    }


class NerService:
    """Checkpoint, engine and scheduler in this process; answers requests from any thread."""

    def __init__(
        self,
        settings: Settings,
        observe_batch: BatchObserver | None = None,
        observe_queue: Callable[[float], None] | None = None,
        engine_loader: EngineLoader | None = None,
    ) -> None:
        """`engine_loader` makes the engine (None: `load_engine`, the runtime the settings choose); the
        bench gives its own to measure everything but the model."""
        self.settings = settings
        self.checkpoint: Checkpoint = load_checkpoint(
            settings.checkpoint, settings.revision, settings.hf_token, settings.mounts
        )
        tokenizer = TextTokenizer(self.checkpoint.tokenizer, self.checkpoint.max_input_tokens, settings.window_stride)
        self.frontend = Frontend(tokenizer, self.checkpoint.labels)
        self.engine = (engine_loader or load_engine)(settings, self.checkpoint)
        self.scheduler = Scheduler(
            self.engine, settings.batch_wait_ms, settings.queue_size, observe_batch, observe_queue
        )

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.frontend.tokenizer

    def submit(self, prepared: Prepared) -> Future[TokenScores]:
        """Queue the request's windows; the Future holds their scores (cancelling it drops the work)."""
        out = TokenScores.empty(prepared.tokens, len(self.frontend.labels), prepared.keep_logits)
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

        job = Job(prepared.sequences, out, done)
        future.add_done_callback(given_up)
        self.scheduler.submit(job)
        return future

    def predict(self, request: PredictRequest, timeout: float | None = None) -> list[list[dict]]:
        """Tokenize, wait for the engine, aggregate: one response list per text."""
        prepared = self.frontend.prepare(request)
        return self.frontend.answer(prepared, self.submit(prepared).result(timeout))

    def warm_up(self) -> None:
        """One real request through every step, so the first client does not pay for lazy init."""
        self.predict(PredictRequest.model_validate(WARMUP), timeout=600)

    def info(self) -> dict:
        return service_info(self.settings, self.checkpoint, self.tokenizer, self.engine)

    def close(self) -> None:
        """Finish queued work, then release the engine."""
        self.scheduler.close(drain=True)
        self.engine.close()
