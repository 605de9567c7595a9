"""Cross-request dynamic batching: one thread owns the engine and feeds it token-budget batches.

Requests submit their token sequences and get a Future. The worker takes every job waiting (up
to the token budget, waiting at most `batch_wait_ms` for more: 0 by default, continuous
batching), plans batches over the union of their sequences longest-first, runs them, and
resolves each job when all of its sequences are done. A batch that raises fails only the jobs with a
sequence in it; a job whose client went away is skipped. The queue is bounded in sequences: a full
queue refuses the whole job at once (429), so nothing is ever half done."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import Future, InvalidStateError

import numpy as np

from .engines.base import Engine
from .errors import Backend, Overloaded, Unhealthy


@dataclasses.dataclass(eq=False)
class Job:
    """One request's sequences and where their logits go."""

    sequences: list[np.ndarray]
    future: Future = dataclasses.field(default_factory=Future)
    results: list[np.ndarray | None] = dataclasses.field(init=False)
    remaining: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sequences)
        self.remaining = len(self.sequences)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class Scheduler:
    """Owns the engine; `submit` from any thread, results come back through Futures."""

    def __init__(
        self, engine: Engine, max_num_tokens: int, batch_wait_ms: float, queue_size: int, observe_batch=None
    ) -> None:
        self.engine = engine
        self.max_num_tokens = max_num_tokens
        self.batch_wait = batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self._observe_batch = observe_batch or (lambda size, tokens, padded, seconds: None)
        self._pending: collections.deque[Job] = collections.deque()
        self._queued_sequences = 0
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="nerserve-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Sequences waiting for the engine."""
        return self._queued_sequences

    def submit(self, sequences: list[np.ndarray]) -> Job:
        """Queue a request's sequences, or refuse it whole when the queue is full or closing."""
        job = Job(sequences)
        if not sequences:
            job.future.set_result([])
            return job
        with self._lock:
            if self._closing:
                raise Unhealthy("the server is shutting down")
            if self._queued_sequences + len(sequences) > self.queue_size and self._queued_sequences:
                raise Overloaded(
                    f"queue full ({self._queued_sequences} sequences waiting); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._pending.append(job)
            self._queued_sequences += len(sequences)
            self._lock.notify()
        return job

    def close(self, drain: bool = True) -> None:
        """Stop taking jobs; with `drain`, finish those queued first."""
        with self._lock:
            self._closing = True
            if not drain:
                for job in self._pending:
                    _settle(job.future, error=Unhealthy("the server is shutting down"))
                self._pending.clear()
            self._lock.notify()
        self._thread.join()

    def _take(self) -> list[Job]:
        """Block for the first job, then gather more until the token budget or the wait bound."""
        with self._lock:
            while not self._pending and not self._closing:
                self._lock.wait()
            if not self._pending:
                return []
            deadline = time.perf_counter() + self.batch_wait
            taken = [self._pending.popleft()]
            tokens = taken[0].tokens
            while tokens < self.max_num_tokens:
                if not self._pending:
                    left = deadline - time.perf_counter()
                    if left <= 0 or self._closing:
                        break
                    self._lock.wait(left)
                    continue
                job = self._pending.popleft()
                taken.append(job)
                tokens += job.tokens
            self._queued_sequences -= sum(len(job.sequences) for job in taken)
            return taken

    def _loop(self) -> None:
        while True:
            jobs = [job for job in self._take() if not job.future.cancelled()]
            if not jobs and self._closing and not self._pending:
                return
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        owners = [(job, i) for job in jobs for i in range(len(job.sequences))]
        sequences = [job.sequences[i] for job, i in owners]
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        for batch in self.engine.plan(lengths, self.max_num_tokens):
            members = [owners[i] for i in batch.tolist()]
            live = [(job, i) for job, i in members if not job.future.done()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                logits = self.engine.run([job.sequences[i] for job, i in live])
            except Exception as error:  # an engine fault fails this batch's requests only
                failure = Backend(f"engine failure: {type(error).__name__}: {error}")
                for job, _ in live:
                    _settle(job.future, error=failure)
                continue
            seconds = time.perf_counter() - started
            real = int(lengths[batch].sum())
            padded = len(live) * int(lengths[batch].max()) if self.engine.padded else real
            self._observe_batch(len(live), real, padded, seconds)
            for (job, i), out in zip(live, logits, strict=True):
                job.results[i] = out
                job.remaining -= 1
                if job.remaining == 0:
                    _settle(job.future, result=job.results)


def _settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolve a future unless its client already cancelled it (a race the worker must survive)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
