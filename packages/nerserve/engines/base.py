"""The one interface every runtime implements: token ids in, per-token logits out.

Engines take a list of variable-length sequences rather than a padded matrix, so each runtime
chooses its own layout: ONNX Runtime and TensorRT pad to the longest sequence of the batch (the
batch planner keeps that padding small by packing longest-first), while a packed engine can run
the sequences back to back without padding. `padded` tells the planner which cost to budget."""

from __future__ import annotations

import abc

import numpy as np

from ..batching import plan_batches


class Engine(abc.ABC):
    """A loaded model that turns token ids into label logits."""

    #: runtime name shown in /info ("onnxruntime", "torch", "tensorrt")
    name: str = ""
    #: numeric precision the weights run in ("fp32", "fp16", "bf16", "int8")
    precision: str = "fp32"
    #: True when a batch costs batch_size x longest tokens (padding), False when it costs the sum
    padded: bool = True
    #: padded engines: every sequence of a batch is at least this fraction of the batch's longest
    #: (0.75 is unmeasured for TensorRT and padded torch; ONNX Runtime's 0.9 is bench/padding.py's)
    min_fill: float = 0.75

    def plan(self, lengths: np.ndarray, max_num_tokens: int) -> list[np.ndarray]:
        """Token-budget batches (indices into `lengths`) priced by this engine's cost model."""
        return plan_batches(lengths, max_num_tokens, self.padded, self.min_fill)

    @abc.abstractmethod
    def run(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Logits (float32, shape [len(seq), num_labels]) for each int64 id sequence, in order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release device memory and sessions."""


def pad_batch(sequences: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64 [batch, longest]."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    longest = int(lengths.max()) if len(sequences) else 0
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    ids[mask.astype(bool)] = np.concatenate(sequences) if sequences else np.empty(0, np.int64)
    return ids, mask


def unpad(logits: np.ndarray, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """Split a padded [batch, longest, labels] result back into one array per sequence."""
    return [np.ascontiguousarray(logits[i, : len(s)], dtype=np.float32) for i, s in enumerate(sequences)]
