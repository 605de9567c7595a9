"""ONNX Runtime on CPU: the default engine where there is no GPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import Runtime
from ..platform import usable_cores
from ..scores import TokenScores
from .base import Engine, pad_batch, per_sequence

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..config import Settings
    from ..engine_folder import EngineArtefact


class OnnxRuntimeEngine(Engine):
    """Runs an exported (and checked) ONNX graph with all graph optimizations and one thread per core this
    process may use (a container's CPU quota, not the host's core count)."""

    name = Runtime.ONNXRUNTIME
    padded = True
    min_fill = 0.9  # on CPU a small batch costs little extra; padding costs in full
    #: On CPU, throughput does not grow with the batch (the scheduler's pool of several budgets already
    #: groups sequences of even length) while a batch's time does, and a request arriving waits for about
    #: one batch: 1024 (the model's window is at most 512) was the smallest budget within 5% of the best
    #: on sentences and paragraphs (`bench/budget.py`; its figures are in docs/speed.md, "The CPU
    #: engine's default budget").
    default_max_num_tokens = 1024

    def __init__(self, onnx_path: Path, pad_id: int, precision: str = "fp32") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = usable_cores()
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._pad_id = pad_id
        self.precision = precision

    @classmethod
    def load(cls, checkpoint: Checkpoint, settings: Settings, artefact: EngineArtefact | None) -> OnnxRuntimeEngine:
        """The ONNX file it is handed: an engine folder's graph, or the checkpoint's own checked export
        (export/startup.served_artefact makes it; this runtime only loads)."""
        if artefact is None or artefact.kind != Runtime.ONNXRUNTIME:
            raise ValueError("onnxruntime serves an ONNX file: an engine_dir's, or the checkpoint's own export")
        return cls(artefact.path, pad_id=checkpoint.pad_id, precision=artefact.precision)

    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        return per_sequence(self._real_logits(sequences), sequences)

    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """Softmax and argmax in numpy, on the real tokens only."""
        return TokenScores.of_logits(self._real_logits(sequences), keep_logits)

    def _real_logits(self, sequences: list[np.ndarray]) -> np.ndarray:
        """float32 logits [sum of lengths, labels] of the real tokens of `sequences`, in order."""
        feeds = pad_batch(sequences, self._pad_id)
        logits = self._session.run(["logits"], {name: feeds[name] for name in self._inputs})[0]
        return logits[feeds["attention_mask"].astype(bool)]

    def close(self) -> None:
        """Drop the session: ONNX Runtime frees its weights and arena with it."""
        del self._session
