"""The Truss Model: what `truss.load(".")` runs in-process (and Truss's own server would serve).

Deployed, the image runs `python -m nerserve serve` instead (config.yaml's docker_server: Truss's
server routes only `predict`, API.md has more routes). Both read the settings of config.yaml through
`Settings.from_config`; this runs the whole path in one process (`InProcessService`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_PACKAGES = Path(__file__).resolve().parent.parent / "packages"
if _PACKAGES.is_dir() and str(_PACKAGES) not in sys.path:  # Truss bundles packages/; a plain checkout may not
    sys.path.insert(0, str(_PACKAGES))

from nerserve.config import Settings  # noqa: E402
from nerserve.schemas import parse_request  # noqa: E402
from nerserve.service import InProcessService  # noqa: E402


class Model:
    """Loads the checkpoint and engine once, then answers /predict_tokens payloads."""

    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs.get("config") or {}
        self._secrets = kwargs.get("secrets")
        self._service: InProcessService | None = None

    def load(self) -> None:
        """Load checkpoint and engine, and answer one warm-up request."""
        self._service = InProcessService(Settings.from_config(self._config, self._secrets))
        self._service.warm_up()

    def predict(self, request: dict) -> list[list[dict]]:
        """A /predict_tokens body in, one result list per text out."""
        if self._service is None:
            raise RuntimeError("Model.load() has not run")
        settings = self._service.settings
        return self._service.predict(parse_request(request, settings.max_texts), timeout=settings.request_timeout_s)
