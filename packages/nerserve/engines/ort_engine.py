"""ONNX Runtime on CPU: the default engine where there is no GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import Engine, pad_batch, unpad

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..manifest import EngineArtefact


class OnnxRuntimeEngine(Engine):
    """Runs an exported (and checked) ONNX graph with all graph optimizations and one thread per core."""

    name = "onnxruntime"
    padded = True
    min_fill = 0.9  # on CPU a small batch costs little extra; padding costs in full
    #: On CPU, throughput grows little past a few thousand tokens a batch while a batch's time grows with
    #: its size, and a request arriving waits for about one batch. `bench/budget.py` (minilm, one worker,
    #: 2-core EPYC), texts/s and mean batch ms for sentences / paragraphs: 1024: 298, 58 / 17.4, 133;
    #: 4096: 331, 56 / 16.9, 427; 16384: 335, 54 / 14.7, 849. 4096 is the smallest within 5% of the best on both.
    default_max_num_tokens = 4096

    def __init__(self, onnx_path: Path, pad_id: int, precision: str = "fp32", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._pad_id = pad_id
        self.precision = precision

    @classmethod
    def load(cls, checkpoint: Checkpoint, precision: str | None, artefact: EngineArtefact | None) -> OnnxRuntimeEngine:
        """The folder's graph, or the checkpoint's own checked export (float32: int8 comes from a build)."""
        if artefact is not None:
            return cls(artefact.path, pad_id=checkpoint.pad_id, precision=artefact.precision)
        if precision not in (None, "fp32"):
            raise ValueError(
                f"onnxruntime serves the checkpoint in fp32; precision {precision} needs an engine_dir built "
                "with it (`make build-engine PRECISION=int8`)"
            )
        from ..onnx_export import cached_onnx

        return cls(cached_onnx(checkpoint), pad_id=checkpoint.pad_id)

    def run(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        ids, mask = pad_batch(sequences, self._pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        logits = self._session.run(["logits"], {name: feeds[name] for name in self._inputs})[0]
        return unpad(logits, sequences)

    def close(self) -> None:
        """Drop the session: ONNX Runtime frees its weights and arena with it."""
        del self._session
