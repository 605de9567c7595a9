"""What is decided and made before an engine loads: the artefact the engine process serves
(`served_artefact`: a checked engine folder's plan or graph, or the checkpoint's own checked ONNX
export, made here), and what the container does before the server starts (`python -m
nerserve.export.startup`, run by model/start.sh): decide which TensorRT engine folder the server will
serve, or where to build one. Engines only load what they are handed (engines/ imports nothing of
export/).

With engine `auto` or `tensorrt`, no `engine_dir` set, and a GPU and TensorRT present, the server
should get a TensorRT plan for this checkpoint, GPU, TensorRT version, precision and batch budget:
the folder shipped in the image (`data/engine`) when it fits, else the one in the engine cache (on
Baseten, b10cache survives restarts and is shared by replicas), else a new one built there. Whether a
folder fits is decided by `engine_folder.load_engine_dir`, the check the server itself runs at load.

Prints shell assignments for start.sh: `engine_dir=<folder>` (serve it), or `build_dir=<folder>` with
the build's arguments, or nothing (the server chooses its engine alone). A checkpoint that cannot be
had (no hub, no mount) ends it with a non-zero status and one line saying why, so the container stops
at once instead of retrying for ever."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shlex
import sys
from pathlib import Path

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import AUTO, Runtime, Settings, config_path, load_settings
from ..engine_folder import EngineArtefact, load_engine_dir
from ..engines.selection import choose_runtime
from ..logs import configure
from ..platform import Platform, current_platform
from .onnx_export import cached_onnx

log = logging.getLogger(__name__)
#: Baseten's b10cache, deployment scope: survives restarts, shared by the deployment's replicas
DEFAULT_ENGINE_CACHE = Path("/cache/model/nerserve-engines")


def served_artefact(settings: Settings, checkpoint: Checkpoint) -> EngineArtefact | None:
    """What the engine serves: the `engine_dir` folder's plan or graph where one is set (refused, saying
    why, when it was built from another checkpoint, GPU, TensorRT or precision, or was tampered with);
    else for ONNX Runtime the checkpoint's own fp32 export, made and checked against PyTorch once and
    cached; None where the runtime serves the checkpoint itself (PyTorch)."""
    if settings.engine_dir and settings.engine != Runtime.TORCH:
        artefact = load_engine_dir(
            settings.engine_dir,
            checkpoint,
            engine=settings.engine,
            precision=settings.precision,
            max_num_tokens=settings.max_num_tokens,
        )
        if artefact.note:
            log.warning("%s", artefact.note)
        return artefact
    if choose_runtime(settings, None) != Runtime.ONNXRUNTIME:
        return None
    if settings.precision not in (None, "fp32"):
        raise ValueError(
            f"onnxruntime serves the checkpoint in fp32; precision {settings.precision} needs an engine_dir "
            "built with it (`make build-engine PRECISION=int8`)"
        )
    onnx = cached_onnx(checkpoint, settings.cache_dir)
    return EngineArtefact(Runtime.ONNXRUNTIME, onnx, "fp32", settings.max_num_tokens, None)  # ONNX takes any budget


def engine_cache(settings: Settings) -> Path:
    """The `engine_cache_dir` setting, or b10cache where it is writable, else a folder that lives as long
    as the container (every start then builds again)."""
    for folder in (
        Path(settings.engine_cache_dir or DEFAULT_ENGINE_CACHE),
        Path.home() / ".cache" / "nerserve-engines",
    ):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise RuntimeError("no writable engine cache: set NERSERVE_ENGINE_CACHE_DIR")


def cache_key(checkpoint: Checkpoint, settings: Settings, budget: int, here: Platform) -> str:
    """Names the cached engine of one checkpoint content, precision, budget, GPU and TensorRT version."""
    parts = [checkpoint.sha256, settings.precision or "", str(budget), *map(str, dataclasses.astuple(here))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def choose_engine_folder(settings: Settings, here: Platform, baked: Path) -> dict[str, str]:
    """The assignments for start.sh (see the module docstring)."""
    if settings.engine not in (AUTO, Runtime.TENSORRT) or settings.engine_dir or not here.tensorrt_version:
        return {}
    if not here.has_gpu:
        return {}
    from ..engines.tensorrt_engine import TensorRTEngine

    checkpoint = load_checkpoint(settings.checkpoint, settings.revision, settings.hf_token, settings.mounts)
    budget = TensorRTEngine.budget(settings.max_num_tokens)
    target = engine_cache(settings) / cache_key(checkpoint, settings, budget, here)
    for folder in (baked, target):
        if not (folder / "manifest.json").is_file():
            continue
        try:
            load_engine_dir(folder, checkpoint, Runtime.TENSORRT, here, settings.precision, settings.max_num_tokens)
        except ValueError as why:
            log.warning("start: not serving %s: %s", folder, why)
            continue
        return {"engine_dir": str(folder)}
    # The build reads the folder already resolved here (mount or hub cache): no second download.
    return {
        "build_dir": str(target),
        "checkpoint": str(checkpoint.path),
        "precision": settings.precision or "",
        "max_num_tokens": str(budget),
    }


def main() -> int:
    configure(logging.INFO, "start")
    path = config_path()
    try:
        settings = load_settings()
        assignments = choose_engine_folder(settings, current_platform(), path.parent / "data" / "engine")
    except Exception as error:  # one line, the cause: the container stops and the platform shows it
        print(f"nerserve: cannot start: {error}", file=sys.stderr)
        return 1
    for name, value in assignments.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
