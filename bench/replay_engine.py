"""An engine that answers from logits computed before the run, so a bench measures everything but the
model: HTTP, validation, tokenization, the transport to the engine process, scheduling, aggregation and
encoding (the server's host capacity, what a GPU would need from it).

`record` runs the real engine once over the bench's texts and saves every window's logits, keyed by its
token ids; `load` is the engine loader the bench's server uses (the file named by NERSERVE_BENCH_REPLAY).
The softmax and argmax still run in the engine process, as for a real CPU engine."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from nerserve.checkpoint import Checkpoint
from nerserve.config import Runtime, Settings
from nerserve.engines.base import Engine
from nerserve.engines.ort_engine import OnnxRuntimeEngine
from nerserve.scores import TokenScores

REPLAY_FILE = "NERBENCH_REPLAY"  # a variable of the bench, passed to the engine process it starts


def key(ids: np.ndarray) -> bytes:
    return np.asarray(ids, dtype=np.int32).tobytes()


def record(engine: Engine, sequences: list[np.ndarray], path: Path) -> Path:
    """Run `engine` over `sequences` (in budget batches) and save {ids: logits}."""
    table: dict[bytes, np.ndarray] = {}
    lengths = np.array([len(s) for s in sequences])
    for batch in engine.batches(lengths, engine.max_num_tokens):
        chosen = [sequences[i] for i in batch.tolist()]
        for ids, logits in zip(chosen, engine.logits(chosen), strict=True):
            table[key(ids)] = logits
    path.write_bytes(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
    return path


class ReplayEngine(Engine):
    """Looks each sequence's logits up; a sequence it has not seen is an error (the bench sends only
    the texts it recorded)."""

    name = Runtime.ONNXRUNTIME  # it stands in for the CPU engine whose logits it recorded
    padded = False

    def __init__(self, table: dict[bytes, np.ndarray], precision: str) -> None:
        self.table = table
        self.precision = precision

    @classmethod
    def load(cls, checkpoint: Checkpoint, settings: Settings, artefact: object = None) -> ReplayEngine:
        table = pickle.loads(Path(os.environ[REPLAY_FILE]).read_bytes())
        return cls(table, settings.precision or "fp32")

    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        return [self.table[key(ids)] for ids in sequences]

    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """Softmax and argmax in numpy, as the CPU engine takes them."""
        return TokenScores.of_logits(np.concatenate(self.logits(sequences)), keep_logits)

    def close(self) -> None:
        self.table = {}


def load(settings: Settings, checkpoint: Checkpoint) -> Engine:
    """The bench server's engine loader: the recorded logits, with the real engine's batch budget."""
    engine = ReplayEngine.load(checkpoint, settings)
    engine.max_num_tokens = OnnxRuntimeEngine.budget(settings.max_num_tokens)
    return engine
