"""Server settings: one set of names, read from `model_metadata` in config.yaml (lower case) and from
the environment as `NERSERVE_<NAME>` (the environment winning), so `make serve CHECKPOINT=...`
overrides config.yaml.

The prefix keeps platform variables out: Baseten (Knative) sets `PORT` to the port of Truss's own
proxy and `HOSTNAME` to the pod's name, and a server that read them as settings would bind the
proxy's port. `HF_TOKEN` is read as well, because that is the name huggingface_hub itself reads."""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "NERSERVE_"
#: where config.yaml is: NERSERVE_CONFIG (the image sets /app/config.yaml), else the working directory's
CONFIG_VARIABLE = "NERSERVE_CONFIG"
DEFAULT_CHECKPOINT = "dslim/bert-base-NER-uncased"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: the `engine` setting that lets the server choose the runtime (engines/selection.py)
AUTO = "auto"
#: the end of the shutdown window left to the engine process, once the workers have drained
ENGINE_STOP_S = 1.0


class Runtime(enum.StrEnum):
    """The runtimes an engine can run on: the names of the `engine` setting (with `auto`), of /info's
    `engine`, and of an engine folder's artefacts."""

    TENSORRT = "tensorrt"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


ENGINES = (AUTO, *Runtime)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, with its default: API.md's Configuration section and the engine's and caches'
    knobs; nothing else in the package reads a `NERSERVE_*` variable (config.yaml's own location,
    NERSERVE_CONFIG, is read by `config_path` before the settings exist). None means "decided at load
    time from the model and the machine" (the engine's batch budget, the window overlap, the number of
    front-end processes)."""

    checkpoint: str = DEFAULT_CHECKPOINT
    revision: str | None = None
    engine: str = AUTO  # auto, or a Runtime
    engine_dir: str | None = None
    precision: str | None = None  # fp32 | fp16 | bf16 | int8; None: the engine's default
    max_num_tokens: int | None = None  # tokens of one engine batch; None: the engine's measured default
    window_stride: int | None = None  # overlap of an over-long text's windows; None: what fits the model
    workers: int | None = None  # front-end processes; None: by the engine (process.default_workers)
    max_texts: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    #: model tokens of one request, windows included (413 past it): what bounds a request's memory and time
    max_request_tokens: int = 262_144
    #: each worker's shared memory for requests in flight; None: transport.ARENA_BYTES (503 when it is full)
    arena_bytes: int | None = None
    queue_size: int = 4096
    batch_wait_ms: float = 0.0  # 0: continuous batching, whatever queued while the engine ran
    request_timeout_s: float = 60.0
    # What one connection may hold of a worker (http/connections.py): an idle connection is closed after
    # keep_alive_s; a request's line and headers must come within header_timeout_s (408) and
    # max_header_bytes (431), its body within body_timeout_s (408); an answer its client stops reading is
    # dropped after send_timeout_s; past max_connections per worker, idle ones are closed and busy ones
    # leave a newcomer only /health, /info and /metrics (503 otherwise).
    keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 512
    # After SIGTERM: answer 503 (health too) for `shutdown_grace_s` while the port stays open, then finish
    # what was accepted, and be gone within `shutdown_timeout_s` in all: Truss's supervisord kills the
    # server 10 s after its SIGTERM (stopwaitsecs, default 10), so 8 s leaves room.
    shutdown_grace_s: float = 2.0
    shutdown_timeout_s: float = 8.0
    api_key: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    hf_token: str | None = None
    #: torch engine: True runs packed batches (no padding), False the HF module padded; None: packed on CUDA
    packed: bool | None = None
    #: torch engine on CUDA: capture each token bucket's forward as a CUDA graph
    cuda_graphs: bool = True
    #: derived artefacts (exported ONNX, TensorRT timing caches); None: beside the hub cache (HF_HOME)
    cache: str | None = None
    #: where the container's start builds TensorRT engines; None: b10cache where writable (export/startup.py)
    engine_cache_dir: str | None = None
    #: {"owner/repo@revision": folder} that Truss's `weights` mount (config.yaml), not a model_metadata setting
    mounts: Mapping[str, str] = dataclasses.field(default_factory=dict, metadata={"config_yaml": "weights"})

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], secrets: Any = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """The settings of config.yaml (model_metadata, and the weights Truss mounts) under the
        environment: how the server and the Truss Model both get theirs. `secrets` is Truss's secrets
        mapping, where the hub token may be (`hf_access_token`) when HF_TOKEN is not set."""
        settings = cls.load(config.get("model_metadata"), environ)
        token = settings.hf_token or _secret(secrets, "hf_access_token")
        return dataclasses.replace(settings, mounts=mounted_weights(config), hf_token=token)

    @classmethod
    def load(cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Merge `model_metadata` with `NERSERVE_*` environment variables (the environment wins)."""
        metadata = dict(metadata or {})
        environ = os.environ if environ is None else environ
        types_of = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if "config_yaml" in field.metadata:
                continue
            raw: Any = environ.get(ENV_PREFIX + field.name.upper())
            if raw in (None, ""):
                raw = metadata.get(field.name)
            if raw in (None, ""):
                continue
            values[field.name] = _coerce(field.name, types_of[field.name], raw)
        if "hf_token" not in values and environ.get("HF_TOKEN"):
            values["hf_token"] = environ["HF_TOKEN"]
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the setting (checks that need the model are made
        where it is loaded: the window overlap, the batch budget against the model's length)."""
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.precision not in (None, *PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name in (
            "max_num_tokens",
            "workers",
            "max_texts",
            "max_body_bytes",
            "max_request_tokens",
            "arena_bytes",
            "queue_size",
            "port",
            "max_header_bytes",
            "max_connections",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, not {value}")
        if self.window_stride is not None and self.window_stride < 0:
            raise ValueError(f"window_stride must not be negative, not {self.window_stride}")
        for name in ("request_timeout_s", "keep_alive_s", "header_timeout_s", "body_timeout_s", "send_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must not be negative, not {self.batch_wait_ms}")
        if not 0 <= self.shutdown_grace_s < self.shutdown_timeout_s:
            raise ValueError(
                f"shutdown_grace_s ({self.shutdown_grace_s}) must be at least 0 and less than shutdown_timeout_s "
                f"({self.shutdown_timeout_s}): the drain happens inside the timeout"
            )

    @property
    def workers_stop_s(self) -> float:
        """The part of the shutdown window the workers have to drain in; the engine process stops in the rest."""
        return self.shutdown_timeout_s - ENGINE_STOP_S

    @property
    def cache_dir(self) -> Path:
        """Where derived artefacts live: `cache`, else beside the hub cache (HF_HOME is huggingface_hub's own)."""
        if self.cache:
            return Path(self.cache)
        return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "nerserve"


def load_settings(overrides: Mapping[str, object] | None = None) -> Settings:
    """config.yaml's settings under NERSERVE_* variables, under `overrides` (flags given on the command
    line, None for those not given); ValueError names a setting that cannot work."""
    environ = dict(os.environ)
    for name, value in (overrides or {}).items():
        if value is not None:
            environ[ENV_PREFIX + name.upper()] = str(value)
    return Settings.from_config(read_config(config_path()), environ=environ)


def mounted_weights(config: Mapping[str, Any]) -> dict[str, str]:
    """Hub repositories that Truss's `weights` (config.yaml) mirror at deploy time and mount in the
    container, as {"owner/repo@revision": mount folder} (revision "main" where the source names none)."""
    mounts: dict[str, str] = {}
    for source in config.get("weights") or []:
        uri = str(source.get("source", ""))
        if uri.startswith("hf://") and source.get("mount_location"):
            repo = uri.removeprefix("hf://")
            mounts[repo if "@" in repo else f"{repo}@main"] = str(source["mount_location"])
    return mounts


def config_path(default: Path = Path("config.yaml")) -> Path:
    """The config.yaml in use (NERSERVE_CONFIG, else `default`)."""
    return Path(os.environ.get(CONFIG_VARIABLE) or default).resolve()


def read_config(path: Path) -> dict[str, Any]:
    """config.yaml as a dict ({} where there is none: every setting then has its default)."""
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _secret(secrets: Any, name: str) -> str | None:
    """A Truss secret's value, or None: Truss's mapping raises for a secret that is not configured."""
    try:
        return secrets[name] or None
    except Exception:
        return None


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Convert an environment string (or YAML value) to the field's type; ValueError names the setting."""
    if isinstance(kind, types.UnionType):  # `int | None`: the non-None member
        kind = next(member for member in typing.get_args(kind) if member is not type(None))
    try:
        if kind is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except ValueError:
        raise ValueError(f"{name} must be {kind.__name__}, not {raw!r}") from None
