"""The Truss Model: what `truss push` deploys and `truss.load(".")` runs in-process.

Truss's own server routes only `predict`, so the HTTP routes of API.md are served by
`nerserve.server` (through `docker_server` in config.yaml), which calls this class."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_PACKAGES = Path(__file__).resolve().parent.parent / "packages"
if _PACKAGES.is_dir() and str(_PACKAGES) not in sys.path:  # Truss bundles packages/; a plain checkout may not
    sys.path.insert(0, str(_PACKAGES))

from nerserve.config import Settings  # noqa: E402
from nerserve.schemas import parse_request  # noqa: E402
from nerserve.service import NerService  # noqa: E402


class Model:
    """Loads the checkpoint and engine once, then answers /predict_tokens payloads."""

    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs.get("config") or {}
        self._data_dir = kwargs.get("data_dir")
        self._secrets = kwargs.get("secrets") or {}
        self._service: NerService | None = None

    @property
    def settings(self) -> Settings:
        """model_metadata overridden by the environment; the hub token from Truss's secret if set."""
        metadata = dict(self._config.get("model_metadata") or {})
        token = _secret(self._secrets, "hf_access_token")
        if token and not metadata.get("hf_token"):
            metadata["hf_token"] = token
        return Settings.load(metadata)

    def load(self, observe_batch=None) -> None:
        """Load checkpoint and engine, and answer one warm-up request."""
        self._service = NerService(self.settings, observe_batch=observe_batch)
        self._service.warm_up()

    @property
    def service(self) -> NerService:
        if self._service is None:
            raise RuntimeError("Model.load() has not run")
        return self._service

    def predict(self, request: dict) -> list[list[dict]]:
        """A /predict_tokens body in, one result list per text out."""
        parsed = parse_request(request, self.service.settings.max_texts)
        return self.service.predict(parsed, timeout=self.service.settings.request_timeout_s)


def _secret(secrets: Any, name: str) -> str | None:
    """Truss passes a mapping that raises for a secret not configured; treat that as absent."""
    try:
        value = secrets[name]
    except Exception:
        return None
    return value or None
