"""Engine selection (API.md, Configuration): `auto` takes TensorRT only where a built engine that
matches this checkpoint, GPU and TensorRT exists; else PyTorch on CUDA; else ONNX Runtime."""

from __future__ import annotations

import logging

from ..checkpoint import Checkpoint
from ..config import Settings
from ..manifest import load_engine_dir
from .base import Engine

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def load_engine(settings: Settings, checkpoint: Checkpoint) -> Engine:
    """The engine `settings.engine` names, or the best one available for `auto`."""
    choice = settings.engine
    artefact = None
    if settings.engine_dir and choice != "torch":
        # Refuses, saying why, a folder built from another checkpoint, GPU or TensorRT, or tampered with.
        artefact = load_engine_dir(settings.engine_dir, checkpoint, engine=choice)
    if choice == "auto":
        if artefact is not None and artefact.kind == "tensorrt":
            choice = "tensorrt"
        elif artefact is None and _cuda_available():
            choice = "torch"
        else:
            choice = "onnxruntime"
    log.info("engine: %s", choice)
    pad_id = checkpoint.tokenizer.pad_token_id or 0
    if choice == "tensorrt":
        if artefact is None:
            raise ValueError("engine tensorrt needs engine_dir: a folder made by `make build-engine` on this GPU")
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(artefact.path, pad_id=pad_id)
    if choice == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(checkpoint, precision=settings.precision)
    from ..onnx_export import cached_onnx
    from .ort_engine import OnnxRuntimeEngine

    if artefact is not None:
        return OnnxRuntimeEngine(artefact.path, pad_id=pad_id, precision=artefact.precision)
    return OnnxRuntimeEngine(cached_onnx(checkpoint), pad_id=pad_id)
