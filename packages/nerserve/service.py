"""The whole request path in one process, for the Truss Model (model/model.py), `nerserve tag` in
process, and the tests: the host's half (text/frontend.py) around an engine core (engine/core.py),
which the HTTP server runs in separate processes."""

from __future__ import annotations

from .config import Settings
from .engine.core import EngineCore, EngineLoader
from .schemas import PredictRequest
from .text.frontend import Frontend


class InProcessService:
    """Tokenization, the engine and aggregation in this process; answers requests from any thread."""

    def __init__(self, settings: Settings, engine_loader: EngineLoader | None = None) -> None:
        self.settings = settings
        self.core = EngineCore(settings, engine_loader=engine_loader)
        self.frontend = Frontend(self.core.tokenizer, self.core.labels)

    def predict(self, request: PredictRequest, timeout: float | None = None) -> list[list[dict]]:
        """Tokenize, wait for the engine, aggregate: one response list per text."""
        prepared = self.frontend.prepare(request)
        return self.frontend.answer(prepared, self.core.score(prepared.sequences, prepared.keep_logits).result(timeout))

    def warm_up(self) -> None:
        """One real request through every step, so the first caller does not pay for lazy init."""
        self.core.warm_up()

    def info(self) -> dict:
        return self.core.info()

    def close(self) -> None:
        """Finish queued work, then release the engine."""
        self.core.close()
