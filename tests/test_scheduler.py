"""The scheduler's own rules, against a small fake engine (the property is the scheduler's, not the
model's): a sentence behind a long document waits for about one batch, a cancelled request is dropped
and its arrays are never written again, an engine fault fails only the requests in its batch, and a full
or closing queue refuses a request whole."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import record
from nerserve.config import Runtime
from nerserve.engine.scheduler import Job, Scheduler
from nerserve.engines.base import Engine
from nerserve.errors import ApiError, Cancelled, EngineFailure, Overloaded, Unhealthy
from nerserve.scores import TokenScores

LABELS = 5
POISON = 999  # a token id the fake engine fails on, as a model fails on an id past its embedding table


class FakeEngine(Engine):
    """Packed batches of `max_num_tokens` real tokens; each token's label is its id mod LABELS. A batch
    takes `seconds`, and waits while `gate` is clear (a test holds the engine mid-batch with it)."""

    name = Runtime.ONNXRUNTIME
    padded = False

    def __init__(self, max_num_tokens: int, seconds: float = 0.0) -> None:
        self.max_num_tokens = max_num_tokens
        self.seconds = seconds
        self.gate = threading.Event()
        self.gate.set()
        self.ran: list[list[int]] = []  # the first token id of each sequence, per batch run

    @classmethod
    def load(cls, checkpoint, settings, artefact) -> FakeEngine:  # type: ignore[override]
        raise NotImplementedError("built directly by the tests")

    def logits(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        return [np.eye(LABELS, dtype=np.float32)[s % LABELS] for s in sequences]

    def classify(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        self.gate.wait()
        time.sleep(self.seconds)
        self.ran.append([int(s[0]) for s in sequences])
        ids = np.concatenate(sequences)
        if (ids == POISON).any():
            raise IndexError(f"index {POISON} is out of bounds")
        return TokenScores((ids % LABELS).astype(np.int32), np.ones(len(ids), np.float32), None)

    def close(self) -> None:
        pass


class Recorder:
    """Jobs whose `done` records (name, batches run so far, error)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.finished: list[tuple[str, int, ApiError | None]] = []
        self.settled = threading.Condition()

    def job(self, name: str, sequences: list[np.ndarray]) -> Job:
        out = TokenScores.empty(sum(len(s) for s in sequences), LABELS, False)
        out.labels[:] = -1

        def done(error: ApiError | None) -> None:
            with self.settled:
                self.finished.append((name, len(self.engine.ran), error))
                self.settled.notify_all()

        return Job(sequences, out, done)

    def wait(self, count: int) -> None:
        with self.settled:
            assert self.settled.wait_for(lambda: len(self.finished) >= count, timeout=30), self.finished


def sequences(first_id: int, count: int, length: int) -> list[np.ndarray]:
    return [np.arange(first_id + i * length, first_id + (i + 1) * length) % POISON for i in range(count)]


def test_a_sentence_waits_for_about_one_batch_behind_a_document() -> None:
    """A 14-window document, then a one-sentence request arriving while its first batch runs: the
    sentence is answered within two batches of its arrival (the one running, and its own), long before
    the document."""
    engine = FakeEngine(max_num_tokens=2 * 500, seconds=0.01)
    scheduler = Scheduler(engine, 0.0, 4096)
    jobs = Recorder(engine)
    engine.gate.clear()
    scheduler.submit(jobs.job("document", sequences(1, 14, 500)))
    time.sleep(0.05)  # the scheduler thread is in the document's first batch, held at the gate
    arrived = len(engine.ran)
    scheduler.submit(jobs.job("sentence", sequences(7001, 1, 12)))
    engine.gate.set()
    jobs.wait(2)
    scheduler.close()
    order = {name: batches for name, batches, _ in jobs.finished}
    assert [name for name, _, _ in jobs.finished] == ["sentence", "document"]
    assert order["sentence"] - arrived <= 2 < order["document"] - arrived, jobs.finished
    record(
        f"fair batching: a sentence arriving during batch {arrived + 1} of a 14-window document was answered "
        f"after batch {order['sentence']}; the document after batch {order['document']}"
    )


def test_a_cancelled_request_is_dropped_and_never_written_again() -> None:
    engine = FakeEngine(max_num_tokens=100)
    scheduler = Scheduler(engine, 0.0, 4096)
    jobs = Recorder(engine)
    engine.gate.clear()
    first = jobs.job("first", sequences(1, 1, 100))
    scheduler.submit(first)
    time.sleep(0.05)  # held in the first batch
    doomed = jobs.job("doomed", sequences(200, 10, 100))
    scheduler.submit(doomed)
    scheduler.cancel(doomed)
    engine.gate.set()
    jobs.wait(2)
    scheduler.close()
    outcome = {name: error for name, _, error in jobs.finished}
    assert outcome["first"] is None and isinstance(outcome["doomed"], Cancelled)
    assert (doomed.out.labels == -1).all()  # not one of its rows was written
    assert all(200 not in batch for batch in engine.ran)  # none of its sequences reached the engine
    assert scheduler.depth == 0


def test_an_engine_fault_fails_only_the_requests_in_its_batch() -> None:
    engine = FakeEngine(max_num_tokens=100)
    scheduler = Scheduler(engine, 0.0, 4096)
    jobs = Recorder(engine)
    poisoned = [np.array([POISON] * 50)]
    scheduler.submit(jobs.job("poisoned", poisoned))
    scheduler.submit(jobs.job("healthy", sequences(1, 4, 100)))
    jobs.wait(2)
    after = jobs.job("after", sequences(7, 1, 30))
    scheduler.submit(after)
    jobs.wait(3)
    scheduler.close()
    outcome = {name: error for name, _, error in jobs.finished}
    assert isinstance(outcome["poisoned"], EngineFailure) and "IndexError" in outcome["poisoned"].message
    assert outcome["healthy"] is None and outcome["after"] is None
    assert (after.out.labels == np.arange(7, 37) % LABELS).all()


def test_a_full_queue_refuses_a_request_whole_and_a_closing_one_refuses_all() -> None:
    engine = FakeEngine(max_num_tokens=100)
    scheduler = Scheduler(engine, 0.0, queue_size=8)
    jobs = Recorder(engine)
    engine.gate.clear()
    scheduler.submit(jobs.job("waiting", sequences(1, 6, 10)))
    with pytest.raises(Overloaded, match="queue full"):
        scheduler.submit(jobs.job("too many", sequences(100, 3, 10)))
    assert scheduler.depth == 6  # nothing of the refused request was queued
    scheduler.submit(jobs.job("fits", sequences(300, 2, 10)))
    engine.gate.set()
    jobs.wait(2)
    scheduler.close()
    with pytest.raises(Unhealthy, match="shutting down"):
        scheduler.submit(jobs.job("late", sequences(500, 1, 10)))
    assert sorted(name for name, _, error in jobs.finished if error is None) == ["fits", "waiting"]
