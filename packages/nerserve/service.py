"""The request path, top to bottom: validated request -> tokenization (offsets, truncation or
windows) -> the scheduler's token-budget batches on the engine -> logits -> aggregation -> items."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future

import numpy as np

from . import __version__
from .aggregation import Aggregator
from .checkpoint import Checkpoint, load_checkpoint
from .config import Settings
from .engines import load_engine
from .errors import Invalid
from .scheduler import Scheduler
from .schemas import PredictRequest
from .tokenization import TextTokenizer, Window

log = logging.getLogger(__name__)
WARMUP = {"inputs": ["Apple is looking at buying U.K. startup for $1 billion"], "aggregation_strategy": "simple"}


@dataclasses.dataclass
class Pending:
    """A request between submission and aggregation: its texts, windows and the engine's Future."""

    request: PredictRequest
    texts: list[str]
    windows: list[list[Window]]
    future: Future
    tokens: int


class NerService:
    """Loads the checkpoint and engine once; answers requests from any thread."""

    def __init__(self, settings: Settings, observe_batch=None) -> None:
        self.settings = settings
        self.checkpoint: Checkpoint = load_checkpoint(settings.checkpoint, settings.revision, settings.hf_token)
        if settings.max_num_tokens < self.checkpoint.max_input_tokens:
            raise ValueError(
                f"max_num_tokens={settings.max_num_tokens} is below the model's max input length "
                f"{self.checkpoint.max_input_tokens}: one full window would not fit a batch"
            )
        self.tokenizer = TextTokenizer(
            self.checkpoint.tokenizer, self.checkpoint.max_input_tokens, settings.window_stride
        )
        self.aggregator = Aggregator(self.tokenizer, self.checkpoint.labels)
        self.engine = load_engine(settings, self.checkpoint)
        self.scheduler = Scheduler(
            self.engine, settings.max_num_tokens, settings.batch_wait_ms, settings.queue_size, observe_batch
        )

    def submit(self, request: PredictRequest) -> Pending:
        """Tokenize and queue; the engine runs in the scheduler's thread."""
        texts = request.texts()
        try:
            windows = self.tokenizer.encode(texts, request.truncate, request.truncation_direction)
        except Exception as error:  # tokenizers refuses e.g. lone surrogates
            raise Invalid(f"inputs: cannot tokenize: {error}") from None
        sequences = [w.ids for text_windows in windows for w in text_windows]
        job = self.scheduler.submit(sequences)
        return Pending(request, texts, windows, job.future, sum(len(s) for s in sequences))

    def finish(self, pending: Pending, logits: list[np.ndarray]) -> list[list[dict]]:
        """Aggregate the request's logits into one response list per text."""
        request = pending.request
        if not pending.texts:
            return []
        if request.aggregation_strategy == "none":
            return self.aggregator.tokens(pending.texts, pending.windows, logits, request.raw_scores)
        return self.aggregator.grouped(pending.texts, pending.windows, logits, request.aggregation_strategy)

    def predict(self, request: PredictRequest, timeout: float | None = None) -> list[list[dict]]:
        """Blocking form of submit + finish, for in-process callers (the Truss Model, tests)."""
        pending = self.submit(request)
        return self.finish(pending, pending.future.result(timeout))

    def warm_up(self) -> None:
        """One real request through every step, so the first client does not pay for lazy init."""
        self.predict(PredictRequest.model_validate(WARMUP), timeout=600)

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
            "max_num_tokens": self.settings.max_num_tokens,
            "window_stride": self.settings.window_stride,
            "max_texts": self.settings.max_texts,
            "max_body_bytes": self.settings.max_body_bytes,
            "version": __version__,
        }

    def close(self) -> None:
        """Drain queued work, then release the engine."""
        self.scheduler.close(drain=True)
        self.engine.close()
