"""Whether this worker can serve, and why not: the one answer /health, /info and the predict routes share.
/health says 503 until this worker has its tokenizer from the engine process and has answered a warm-up
request, while draining, and once the engine process is gone."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import Unhealthy
from ..text.frontend import Frontend
from .engine_link import EngineLink


@dataclasses.dataclass
class WorkerState:
    """What this worker has of the model: nothing while the engine process loads, then its tokenizer."""

    link: EngineLink
    frontend: Frontend | None = None
    info: dict[str, Any] | None = None
    failure: str | None = None
    closing: bool = False

    def ready(self) -> Frontend:
        """The frontend, or Unhealthy saying why there is none to serve with."""
        if self.closing:
            raise Unhealthy("the server is shutting down")
        if self.failure:
            raise Unhealthy(self.failure)
        if self.frontend is None:
            raise Unhealthy("model is loading")
        if not self.link.alive:
            raise Unhealthy("the engine process exited")
        return self.frontend
