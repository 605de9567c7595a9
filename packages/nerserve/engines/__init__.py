"""Engine selection (API.md, Configuration): `auto` takes TensorRT only where a built engine that
matches this checkpoint, GPU and TensorRT exists; else PyTorch on CUDA; else ONNX Runtime.

A container that has an NVIDIA GPU which PyTorch cannot use (a CUDA build newer than the driver, a
runtime that did not pass the device through) is refused rather than served from the CPU: with
`auto` that would be a GPU deployment answering at CPU speed without a word."""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import Checkpoint
from ..config import Settings
from ..manifest import EngineArtefact, load_engine_dir
from ..process import nvidia_devices
from .base import Engine

log = logging.getLogger(__name__)


def nvidia_driver(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel driver's version line, where the driver is loaded."""
    try:
        return proc.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def cuda_unusable_reason(
    devices: list[str], cuda_available: bool, torch_version: str, torch_cuda: str | None, driver: str | None
) -> str | None:
    """Why this machine's GPU cannot serve, or None where it can or where there is no GPU at all."""
    if not devices or cuda_available:
        return None
    build = f"PyTorch {torch_version} (built for CUDA {torch_cuda})" if torch_cuda else f"PyTorch {torch_version} (CPU)"
    return (
        f"this machine has an NVIDIA GPU ({', '.join('/dev/' + d for d in devices)}; driver: {driver or 'unknown'}) "
        f"but {build} cannot use it: the driver is older than that CUDA, or the GPU was not passed to the "
        "container. Install a PyTorch built for a CUDA the driver supports (config.yaml's requirements), or "
        "set engine to onnxruntime to serve on the CPU on purpose"
    )


def _cuda_available() -> bool:
    """True when PyTorch can use a CUDA GPU; raises when a GPU is present but unusable."""
    try:
        import torch
    except ImportError:
        return False
    available = torch.cuda.is_available()
    reason = cuda_unusable_reason(nvidia_devices(), available, torch.__version__, torch.version.cuda, nvidia_driver())
    if reason:
        raise RuntimeError(reason)
    return available


def load_engine(settings: Settings, checkpoint: Checkpoint) -> Engine:
    """The engine `settings.engine` names, or the best one available for `auto`, with its batch budget
    (`engine.max_num_tokens`) resolved: the setting, or the engine's own default, lowered to what a
    TensorRT plan was built for."""
    choice = settings.engine
    artefact: EngineArtefact | None = None
    if settings.engine_dir and choice != "torch":
        # Refuses, saying why, a folder built from another checkpoint, GPU, TensorRT or precision, or tampered with.
        artefact = load_engine_dir(
            settings.engine_dir,
            checkpoint,
            engine=choice,
            precision=settings.precision,
            max_num_tokens=settings.max_num_tokens,
        )
        if artefact.note:
            log.warning("%s", artefact.note)
    if choice == "auto":
        if artefact is not None and artefact.kind == "tensorrt":
            choice = "tensorrt"
        elif artefact is None and _cuda_available():
            choice = "torch"
        else:
            choice = "onnxruntime"
    log.info("engine: %s", choice)
    runtime = _runtime(choice)
    budget = runtime.budget(artefact.max_num_tokens if artefact is not None else settings.max_num_tokens)
    if budget < checkpoint.max_input_tokens:
        raise ValueError(
            f"max_num_tokens={budget} is below the model's max input length {checkpoint.max_input_tokens}: "
            "one full window would not fit a batch"
        )
    engine = runtime.load(checkpoint, settings.precision, artefact)
    engine.max_num_tokens = budget
    return engine


def _runtime(choice: str) -> type[Engine]:
    """The Engine class of runtime `choice`, imported only when chosen (torch and tensorrt are heavy)."""
    if choice == "tensorrt":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine
    if choice == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine
    from .ort_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine
