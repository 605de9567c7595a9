"""What an engine hands back for a run of tokens: each token's top label and that label's probability,
and the raw logits only where the request needs them (`raw_scores`, or `average`, which averages
whole probability rows). Softmax and argmax happen where the logits are (on the GPU for the torch
engine), so the host receives 8 bytes per token instead of 4 per label."""

from __future__ import annotations

import dataclasses

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis, computed as the pipeline computes it (same operations, so
    the same bits: its scores are ours)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Per-token engine output, tokens in the order of the sequences they came from."""

    labels: np.ndarray  # int32 [n]: argmax of the probabilities (the pipeline's `scores.argmax()`)
    probs: np.ndarray  # float32 [n]: the probability of that label
    logits: np.ndarray | None  # float32 [n, labels], where asked for

    @classmethod
    def of_logits(cls, logits: np.ndarray, keep_logits: bool) -> TokenScores:
        """Softmax and argmax of float32 logits [n, labels] in numpy."""
        logits = np.asarray(logits, dtype=np.float32)
        probs = softmax(logits)
        labels = probs.argmax(axis=-1)
        top = probs[np.arange(len(labels)), labels]
        return cls(labels.astype(np.int32), top.astype(np.float32), logits if keep_logits else None)

    @classmethod
    def empty(cls, tokens: int, num_labels: int, keep_logits: bool) -> TokenScores:
        """Arrays to be filled in place, batch by batch (the scheduler's per-request output)."""
        logits = np.empty((tokens, num_labels), np.float32) if keep_logits else None
        return cls(np.empty(tokens, np.int32), np.empty(tokens, np.float32), logits)

    def __len__(self) -> int:
        return len(self.labels)

    def copy(self) -> TokenScores:
        """The same scores in arrays of their own (out of a shared-memory block that is about to be reused)."""
        return TokenScores(self.labels.copy(), self.probs.copy(), None if self.logits is None else self.logits.copy())

    def take(self, rows: np.ndarray | slice) -> TokenScores:
        """The scores of the given token rows."""
        return TokenScores(self.labels[rows], self.probs[rows], None if self.logits is None else self.logits[rows])

    def put(self, rows: slice, other: TokenScores) -> None:
        """Write `other` into the given rows (logits only where both hold them)."""
        self.labels[rows] = other.labels
        self.probs[rows] = other.probs
        if self.logits is not None and other.logits is not None:
            self.logits[rows] = other.logits
