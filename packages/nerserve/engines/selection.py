"""Engine selection (API.md, Configuration): `auto` takes TensorRT only where a built engine that
matches this checkpoint, GPU and TensorRT exists; else PyTorch on CUDA; else ONNX Runtime.

A container that has an NVIDIA GPU which PyTorch cannot use (a CUDA build newer than the driver, a
runtime that did not pass the device through) is refused rather than served from the CPU
(`platform.cuda_available`): with `auto` that would be a GPU deployment answering at CPU speed
without a word."""

from __future__ import annotations

import logging

from ..checkpoint import Checkpoint
from ..config import AUTO, Runtime, Settings
from ..engine_folder import EngineArtefact
from ..platform import cuda_available
from .base import Engine

log = logging.getLogger(__name__)


def choose_runtime(settings: Settings, artefact: EngineArtefact | None) -> Runtime:
    """The runtime `settings.engine` names, or for `auto` the best this machine and folder allow."""
    if settings.engine != AUTO:
        return Runtime(settings.engine)
    if artefact is not None and artefact.kind == Runtime.TENSORRT:
        return Runtime.TENSORRT
    if artefact is None and cuda_available():
        return Runtime.TORCH
    return Runtime.ONNXRUNTIME


def load_engine(settings: Settings, checkpoint: Checkpoint, artefact: EngineArtefact | None) -> Engine:
    """The engine the settings choose, loaded from `artefact` (what export/startup.served_artefact made
    or checked: a TensorRT plan or an ONNX file; None for PyTorch, which serves the checkpoint itself),
    with its batch budget (`engine.max_num_tokens`) resolved: the setting, or the engine's own default,
    lowered to what a TensorRT plan was built for."""
    choice = choose_runtime(settings, artefact)
    log.info("engine: %s", choice)
    runtime = engine_class(choice)
    budget = runtime.budget(artefact.max_num_tokens if artefact is not None else settings.max_num_tokens)
    if budget < checkpoint.max_input_tokens:
        raise ValueError(
            f"max_num_tokens={budget} is below the model's max input length {checkpoint.max_input_tokens}: "
            "one full window would not fit a batch"
        )
    engine = runtime.load(checkpoint, settings, artefact)
    engine.max_num_tokens = budget
    return engine


def engine_class(runtime: Runtime) -> type[Engine]:
    """The Engine class of `runtime`, imported only when chosen (torch and tensorrt are heavy)."""
    if runtime == Runtime.TENSORRT:
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine
    if runtime == Runtime.TORCH:
        from .torch_engine import TorchEngine

        return TorchEngine
    from .ort_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine
