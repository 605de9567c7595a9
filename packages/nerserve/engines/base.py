"""The one interface every runtime implements: token ids in, per-token scores out (`classify`: each
token's top label and probability, and its logits where asked; `run`: the logits themselves).

Engines take a list of variable-length sequences rather than a padded matrix, so each runtime
chooses its own layout: ONNX Runtime and TensorRT pad to the longest sequence of the batch (the
batch planner keeps that padding small by packing longest-first), while a packed engine can run
the sequences back to back without padding. `padded` tells the planner which cost to budget."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import numpy as np

from ..config import Runtime
from ..scores import TokenScores
from .batching import budget_batches

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..config import Settings
    from ..engine_folder import EngineArtefact


class Engine(abc.ABC):
    """A loaded model that turns token ids into label logits."""

    #: the runtime, as /info shows it
    name: Runtime
    #: numeric precision the weights run in ("fp32", "fp16", "bf16", "int8")
    precision: str = "fp32"
    #: True when a batch costs batch_size x longest tokens (padding), False when it costs the sum
    padded: bool = True
    #: padded engines: every sequence of a batch is at least this fraction of the batch's longest
    #: (0.75 is unmeasured for TensorRT and padded torch; ONNX Runtime's 0.9 is bench/padding.py's)
    min_fill: float = 0.75
    #: the batch budget (real tokens, or batch x longest when padded) where `max_num_tokens` is unset
    default_max_num_tokens: int = 16384
    #: the budget this engine serves with, set by load_engine (the setting, this default, or a plan's)
    max_num_tokens: int = default_max_num_tokens

    @classmethod
    def budget(cls, requested: int | None) -> int:
        """The batch budget to serve with: `requested` (the setting, or what a plan was built for), else
        this runtime's default."""
        return requested or cls.default_max_num_tokens

    @classmethod
    @abc.abstractmethod
    def load(cls, checkpoint: Checkpoint, settings: Settings, artefact: EngineArtefact | None) -> Engine:
        """This runtime for `checkpoint` with the settings' precision (and the runtime's own knobs), from the
        built engine folder's `artefact` where one is served."""

    def batches(self, lengths: np.ndarray, max_num_tokens: int) -> list[np.ndarray]:
        """Token-budget batches (indices into `lengths`) priced by this engine's cost model."""
        return budget_batches(lengths, max_num_tokens, self.padded, self.min_fill)

    @abc.abstractmethod
    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Logits (float32, shape [len(seq), num_labels]) for each int64 id sequence, in order."""

    @abc.abstractmethod
    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """The scores of every token of `sequences`, concatenated in order, taken where the logits are
        (numpy for ONNX Runtime, the device for torch and TensorRT)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release device memory and sessions."""


def scores_of_tensor(logits, keep_logits: bool) -> TokenScores:
    """TokenScores from a torch tensor of logits [n, labels] on any device: softmax, max and argmax run
    there (the first index on a tie, as numpy's argmax), and only labels and probabilities (and the
    logits where asked) are copied to the host."""
    logits = logits.float()
    probs, labels = logits.softmax(dim=-1).max(dim=-1)
    return TokenScores(
        labels.int().cpu().numpy(),
        probs.cpu().numpy(),
        logits.cpu().numpy() if keep_logits else None,
    )


#: every input an exported graph may have, as engines feed them: token types are all 0 (one segment)
FEEDS = ("input_ids", "attention_mask", "token_type_ids")


def pad_batch(sequences: list[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest sequence: a value for each of FEEDS, int64 [batch, longest] (an engine
    passes the ones its graph or module takes)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    longest = int(lengths.max()) if len(sequences) else 0
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    ids[mask.astype(bool)] = np.concatenate(sequences) if sequences else np.empty(0, np.int64)
    return dict(zip(FEEDS, (ids, mask, np.zeros_like(ids)), strict=True))


def per_sequence(real: np.ndarray, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """The real tokens' logits [sum of lengths, labels], in order, as one array per sequence (views)."""
    return np.split(real, np.cumsum([len(s) for s in sequences])[:-1])
