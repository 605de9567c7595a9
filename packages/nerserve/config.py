"""Server settings: one set of names, read from `model_metadata` (lower case) and the environment
(upper case), the environment winning, so `make serve CHECKPOINT=...` overrides `config.yaml`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

DEFAULT_CHECKPOINT = "dslim/bert-base-NER-uncased"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of API.md's Configuration section, with its default."""

    checkpoint: str = DEFAULT_CHECKPOINT
    revision: str | None = None
    engine: str = "auto"  # auto | tensorrt | torch | onnxruntime
    engine_dir: str | None = None
    precision: str | None = None  # fp32 | fp16 | bf16 | int8; None: the engine's default
    max_num_tokens: int = 16384
    window_stride: int = 128
    max_texts: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    queue_size: int = 4096
    batch_wait_ms: float = 0.0  # 0: continuous batching, whatever queued while the engine ran
    request_timeout_s: float = 60.0
    shutdown_grace_s: float = 5.0  # after SIGTERM: answer 503 to new requests this long, then stop
    api_key: str | None = None
    port: int = 8000
    hf_token: str | None = None

    @classmethod
    def load(cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Merge `model_metadata` with environment variables (upper-case names win)."""
        metadata = dict(metadata or {})
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(field.name.upper())
            if raw in (None, ""):
                raw = metadata.get(field.name)
            if raw in (None, ""):
                continue
            values[field.name] = _coerce(field.name, field.default, raw)
        if "hf_token" not in values and environ.get("HF_TOKEN"):
            values["hf_token"] = environ["HF_TOKEN"]
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.engine not in ("auto", "tensorrt", "torch", "onnxruntime"):
            raise ValueError(f"engine must be auto, tensorrt, torch or onnxruntime, not {self.engine!r}")
        if self.precision not in (None, "fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"precision must be fp32, fp16, bf16 or int8, not {self.precision!r}")
        for name in ("max_num_tokens", "max_texts", "max_body_bytes", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.window_stride < 0:
            raise ValueError("window_stride must not be negative")


def _coerce(name: str, default: Any, raw: Any) -> Any:
    """Convert an environment string (or YAML value) to the type of the field's default."""
    if isinstance(default, bool):
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return str(raw)
