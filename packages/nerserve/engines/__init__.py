"""Engine selection (API.md, Configuration): `auto` takes TensorRT only where a built engine that
matches this checkpoint, GPU and TensorRT exists; else PyTorch on CUDA; else ONNX Runtime."""

from __future__ import annotations

import logging

from ..checkpoint import Checkpoint
from ..config import Settings
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
    if settings.engine_dir:
        from .tensorrt_engine import load_engine_dir

        artefact = load_engine_dir(settings.engine_dir, checkpoint)  # refuses a mismatched manifest, saying why
    if choice == "auto":
        if artefact is not None and artefact[0] == "tensorrt":
            choice = "tensorrt"
        elif _cuda_available():
            choice = "torch"
        else:
            choice = "onnxruntime"
    log.info("engine: %s", choice)
    if choice == "tensorrt":
        if artefact is None or artefact[0] != "tensorrt":
            raise ValueError("engine tensorrt needs engine_dir with a TensorRT engine built for this GPU "
                             "(make build-engine on a GPU machine)")
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(artefact[1], pad_id=checkpoint.tokenizer.pad_token_id or 0)
    if choice == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(checkpoint, precision=settings.precision)
    from .ort_engine import OnnxRuntimeEngine
    from ..onnx_export import cached_onnx

    if artefact is not None and artefact[0] == "onnx":
        path, precision = artefact[1], artefact[2]
    else:
        path, precision = cached_onnx(checkpoint), "fp32"
    return OnnxRuntimeEngine(path, pad_id=checkpoint.tokenizer.pad_token_id or 0, precision=precision)
