"""Token-budget batch planning: which sequences run together in one engine call.

For a padded engine, sequences are taken longest-first, so neighbours have similar lengths and a batch
wastes little; a batch closes when one more sequence would push its cost (batch x longest) past
`max_num_tokens`, or when the next sequence is shorter than `min_fill` x the batch's longest: padding
is paid in full (attention is quadratic in it), and on ONNX Runtime/CPU bounding it at 10% ran CoNLL
sentences several times faster than filling the budget (`bench/padding.py`; its figures are in
docs/speed.md, "What moved the CPU figures"). A packed engine pays only for real tokens, so its
batches keep the order they are given (the scheduler's: oldest request first) and close at the
budget: requests finish in order."""

from __future__ import annotations

import numpy as np


def budget_batches(lengths: np.ndarray, max_num_tokens: int, padded: bool, min_fill: float = 0.0) -> list[np.ndarray]:
    """Indices into `lengths` for each batch (padded: longest sequences first; packed: in the given
    order); every index appears once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    if int(lengths.max()) > max_num_tokens:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds max_num_tokens={max_num_tokens}")
    order = np.argsort(-lengths, kind="stable") if padded else np.arange(len(lengths))
    ordered = lengths[order]
    ends = np.cumsum(ordered)
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        if padded:  # descending order: the first sequence of the batch is its longest
            longest = max(int(ordered[start]), 1)
            long_enough = int(np.searchsorted(-ordered, -min_fill * longest, side="right"))
            end = min(start + max_num_tokens // longest, long_enough)
        else:
            spent = int(ends[start - 1]) if start else 0
            end = int(np.searchsorted(ends, spent + max_num_tokens, side="right"))
        end = min(max(end, start + 1), len(order))
        batches.append(order[start:end])
        start = end
    return batches
