"""Cross-request batching: one thread owns the engine and feeds it token-budget batches built from
every request in flight, each request getting its share.

A request arrives as a Job: its token sequences and the arrays its scores go into (plain numpy for a
caller in this process, views into a front-end worker's shared memory in the engine process). The
engine thread works in steps. A step gathers at most `max_num_tokens` real tokens across the active
jobs by fair shares (water-filling: a job needing less than an equal share takes what it needs, the
rest is split among the others; the job first in a rotating turn always gets at least one sequence,
so no job waits for ever), plans them into batches with the engine's cost model, and runs the
shortest batches first. A job that arrives while a step runs is in the next step: a one-sentence
request waits for at most about one batch, never for every window of a long document that came
first. Within a job, sequences go longest first, so a long job's batches stay even in length.

The queue is bounded in sequences not yet run: a full queue refuses the whole job at once (429), so
nothing is ever half done. A batch that raises fails only the jobs with a sequence in it; a
cancelled job (client gone, timed out) is dropped at the next step, after which nothing is written
to its arrays again (the caller may then reuse them)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from .engines.base import Engine
from .errors import ApiError, Backend, Cancelled, Overloaded, Unhealthy
from .scores import TokenScores

log = logging.getLogger(__name__)

#: called once per job: None when its scores are all written, else why not
Done = Callable[[ApiError | None], None]
#: (sequences in the batch, real tokens, padded tokens, seconds) after each engine batch
BatchObserver = Callable[[int, int, int, float], None]


@dataclasses.dataclass(eq=False)
class Job:
    """One request's sequences, where their scores go, and how far the engine has got with them."""

    sequences: list[np.ndarray]
    out: TokenScores  # rows in the order of `sequences`, concatenated
    done: Done
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.lengths = np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))
        self.rows = np.concatenate([[0], np.cumsum(self.lengths)])  # first output row of each sequence
        self.order = np.argsort(-self.lengths, kind="stable")  # longest first
        self.cursor = 0  # sequences of `order` handed to a step so far
        self.unfinished = len(self.sequences)  # sequences whose scores are not written yet
        self.remaining_tokens = int(self.lengths.sum())  # tokens not yet handed to a step
        self.started: float | None = None
        self.settled = False

    def settle(self, error: ApiError | None) -> None:
        """Call `done` once; later calls (a failed batch's other sequences, a late cancel) do nothing."""
        if not self.settled:
            self.settled = True
            self.done(error)

    @property
    def keep_logits(self) -> bool:
        return self.out.logits is not None

    def next_length(self) -> int | None:
        return int(self.lengths[self.order[self.cursor]]) if self.cursor < len(self.order) else None

    def take(self) -> int:
        """Hand the next sequence to a step; its index."""
        index = int(self.order[self.cursor])
        self.cursor += 1
        self.remaining_tokens -= int(self.lengths[index])
        return index


def water_fill(needs: list[int], budget: int) -> list[int]:
    """Max-min fair shares of `budget`: each need gets min(need, an equal split of what is left)."""
    shares = [0] * len(needs)
    left = budget
    for position, index in enumerate(sorted(range(len(needs)), key=needs.__getitem__)):
        share = min(needs[index], left // (len(needs) - position))
        shares[index] = share
        left -= share
    return shares


class Scheduler:
    """Owns the engine; `submit` from any thread, each job's `done` is called from the engine thread."""

    def __init__(
        self,
        engine: Engine,
        batch_wait_ms: float,
        queue_size: int,
        observe_batch: BatchObserver | None = None,
        observe_queue: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_num_tokens = engine.max_num_tokens
        self.batch_wait = batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self._observe_batch = observe_batch or (lambda size, tokens, padded, seconds: None)
        self._observe_queue = observe_queue or (lambda seconds: None)
        self._arrived: list[Job] = []
        self._active: list[Job] = []
        self._queued_sequences = 0  # sequences submitted and not yet handed to a step
        self._turn = 0
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="nerserve-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Sequences waiting for the engine."""
        return self._queued_sequences

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it whole (raising) when the queue is full or the scheduler closing."""
        if not job.sequences:
            job.settle(None)
            return
        with self._lock:
            if self._closing:
                raise Unhealthy("the server is shutting down")
            if self._queued_sequences + len(job.sequences) > self.queue_size and self._queued_sequences:
                raise Overloaded(
                    f"queue full ({self._queued_sequences} sequences waiting); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._arrived.append(job)
            self._queued_sequences += len(job.sequences)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """Drop the job at the next step; its `done` then gets Cancelled (thread-safe, idempotent)."""
        with self._lock:
            job.cancelled = True
            self._lock.notify()

    def close(self, drain: bool = True) -> None:
        """Stop taking jobs; with `drain`, finish those queued first, else fail them."""
        with self._lock:
            self._closing = True
            if not drain:
                for job in self._arrived + self._active:
                    job.cancelled = True
            self._lock.notify()
        self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            dropped: list[Job] = []
            step = self._next_step(dropped)
            for job in dropped:
                job.settle(Cancelled("cancelled"))
            if step is None:
                return
            if step:
                self._run(step)

    def _next_step(self, dropped: list[Job]) -> list[tuple[Job, int]] | None:
        """Wait for work; admit arrivals; drop cancelled jobs (into `dropped`, settled by the caller outside
        the lock); pick the step's sequences (None: closed and nothing left)."""
        with self._lock:
            while not self._arrived and not self._active and not self._closing:
                self._lock.wait()
            if self.batch_wait and self._arrived and not self._active:  # wait to fill a first batch
                deadline = time.perf_counter() + self.batch_wait
                while (
                    (left := deadline - time.perf_counter()) > 0
                    and not self._closing
                    and sum(job.remaining_tokens for job in self._arrived) < self.max_num_tokens
                ):
                    self._lock.wait(left)
            self._active.extend(self._arrived)
            self._arrived.clear()
            dropped.extend(job for job in self._active if job.cancelled or job.settled)
            for job in dropped:
                self._active.remove(job)
                self._queued_sequences -= len(job.sequences) - job.cursor
            if not self._active:
                return None if self._closing else []
            step = self._select()
            self._queued_sequences -= len(step)
            return step

    def _select(self) -> list[tuple[Job, int]]:
        """Up to `max_num_tokens` real tokens of (job, sequence index) by fair shares (module docstring)."""
        waiting = [job for job in self._active if job.next_length() is not None]
        if not waiting:
            return []
        self._turn = (self._turn + 1) % len(waiting)
        waiting = waiting[self._turn :] + waiting[: self._turn]
        shares = water_fill([job.remaining_tokens for job in waiting], self.max_num_tokens)
        left, picks = self.max_num_tokens, list[tuple[Job, int]]()
        for fill_up in (False, True):  # fair shares first, then what they left to whoever can use it
            for position, job in enumerate(waiting):
                cap, taken = (left if fill_up else shares[position]), 0
                while (length := job.next_length()) is not None and length <= left:
                    if taken + length > cap and (fill_up or picks or position):
                        break
                    picks.append((job, job.take()))
                    taken += length
                    left -= length
        return picks

    def _run(self, step: list[tuple[Job, int]]) -> None:
        lengths = np.fromiter((job.lengths[i] for job, i in step), dtype=np.int64, count=len(step))
        batches = self.engine.plan(lengths, self.max_num_tokens)
        for batch in reversed(batches):  # shortest first: a short request's batch does not wait behind long ones
            live = [(job, i) for job, i in (step[k] for k in batch.tolist()) if not (job.cancelled or job.settled)]
            if not live:
                continue
            started = time.perf_counter()
            for job, _ in live:
                if job.started is None:
                    job.started = started
                    self._observe_queue(started - job.arrived)
            try:
                scores = self.engine.classify(
                    [job.sequences[i] for job, i in live], any(j.keep_logits for j, _ in live)
                )
            except Exception as error:  # an engine fault fails this batch's requests only
                log.warning("engine failure on a batch of %d sequences: %s: %s", len(live), type(error).__name__, error)
                self._fail({job for job, _ in live}, Backend(f"engine failure: {type(error).__name__}: {error}"))
                continue
            seconds = time.perf_counter() - started
            real = int(sum(len(job.sequences[i]) for job, i in live))
            padded = len(live) * max(len(job.sequences[i]) for job, i in live) if self.engine.padded else real
            self._observe_batch(len(live), real, padded, seconds)
            row = 0
            for job, i in live:
                length = int(job.lengths[i])
                job.out.put(slice(int(job.rows[i]), int(job.rows[i]) + length), scores.take(slice(row, row + length)))
                row += length
                self._finish_one(job)

    def _finish_one(self, job: Job) -> None:
        job.unfinished -= 1
        if job.unfinished == 0:
            with self._lock:
                self._active.remove(job)
            job.settle(None)

    def _fail(self, jobs: set[Job], error: ApiError) -> None:
        """Fail whole jobs: the rest of their sequences are dropped at the next step (settled jobs are)."""
        for job in jobs:
            job.settle(error)
