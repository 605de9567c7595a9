"""Cross-request batching: one thread owns the engine and feeds it token-budget batches built from
every request in flight, each request getting its share.

A request arrives as a Job: its token sequences and the arrays its scores go into (plain numpy for a
caller in this process, views into a front-end worker's shared memory in the engine process). The
scheduler thread works in steps:
- a step gathers a pool of up to POOL_BATCHES budgets of real tokens across the active jobs, oldest
  first, by fair shares (water-filling: a job needing less than an equal share takes what it needs,
  the rest is split among the others; the oldest job always gets at least one sequence, so no job
  waits for ever), and plans the pool into batches of at most `max_num_tokens` with the engine's cost
  model (a pool of several batches lets a padded engine group sequences of even length; a packed
  engine's batches keep the pool's order);
- it runs first the batches of the requests with the least left to do (a sentence before a document,
  whether it came first or not), except that the oldest request goes first in a step when the
  previous step ended before its batch ran (so it keeps moving: nothing starves);
- after each batch, if requests arrived meanwhile, the step ends: what it did not run goes back to
  its jobs, and the next step's pool takes the newcomers in.
So a one-sentence request waits for about one batch, never for every window of a long document that
came first, nor for a long document that came just before it. Within a job, sequences go longest
first, so a long job's batches stay even in length.

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

from ..engines.base import Engine
from ..errors import ApiError, Cancelled, EngineFailure, Overloaded, Unhealthy
from ..scores import TokenScores

log = logging.getLogger(__name__)

#: called once per job: None when its scores are all written, else why not
Done = Callable[[ApiError | None], None]
#: (sequences in the batch, real tokens, padded tokens, seconds) after each engine batch
BatchObserver = Callable[[int, int, int, float], None]


#: a step's pool, in batch budgets: enough for a padded engine to group sequences of even length
POOL_BATCHES = 16


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
        self.pending: list[int] = np.argsort(-self.lengths, kind="stable").tolist()  # not yet in a step: longest first
        self.unfinished = len(self.sequences)  # sequences whose scores are not written yet
        self.remaining_tokens = int(self.lengths.sum())  # tokens of `pending`
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

    @property
    def dropped(self) -> bool:
        return self.cancelled or self.settled

    def next_length(self) -> int | None:
        return int(self.lengths[self.pending[0]]) if self.pending else None

    def take(self) -> int:
        """Hand the next sequence to a step; its index."""
        index = self.pending.pop(0)
        self.remaining_tokens -= int(self.lengths[index])
        return index

    def give_back(self, indices: list[int]) -> None:
        """Sequences a step did not run: pending again, in their place (longest first)."""
        self.pending = sorted(self.pending + indices, key=lambda i: -int(self.lengths[i]))
        self.remaining_tokens += int(self.lengths[indices].sum())


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
    """Owns the engine; `submit` from any thread, each job's `done` is called from the scheduler thread."""

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
        self._queued_sequences = 0  # sequences submitted whose batch has not run
        self._passed_over: Job | None = None  # the oldest request, when the last step ended before its batch
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="nerserve-scheduler", daemon=True)
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
                raise Overloaded(f"queue full ({self._queued_sequences} sequences waiting); retry shortly")
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

    # ---- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            dropped: list[Job] = []
            pool = self._next_pool(dropped)
            for job in dropped:
                job.settle(Cancelled("cancelled"))
            if pool is None:
                return
            if pool:
                self._run(pool)

    def _next_pool(self, dropped: list[Job]) -> list[tuple[Job, int]] | None:
        """Wait for work; admit arrivals; drop cancelled and failed jobs (into `dropped`, settled by the
        caller outside the lock); pick the step's pool (None: closed and nothing left)."""
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
            dropped.extend(job for job in self._active if job.dropped)
            for job in dropped:
                self._active.remove(job)
                self._queued_sequences -= job.unfinished
            if not self._active:
                return None if self._closing else []
            return self._select(POOL_BATCHES * self.max_num_tokens)

    def _select(self, budget: int) -> list[tuple[Job, int]]:
        """Up to `budget` real tokens of (job, sequence index) by fair shares (module docstring)."""
        waiting = [job for job in self._active if job.pending]  # oldest first
        if not waiting:
            return []
        shares = water_fill([job.remaining_tokens for job in waiting], budget)
        left, picks = budget, list[tuple[Job, int]]()
        for fill_up in (False, True):  # fair shares first, then what they left to whoever can use it
            for position, job in enumerate(waiting):
                cap, taken = (left if fill_up else shares[position]), 0
                while (length := job.next_length()) is not None and length <= min(left, self.max_num_tokens):
                    if taken + length > cap and (fill_up or picks or position):
                        break
                    picks.append((job, job.take()))
                    taken += length
                    left -= length
        return picks

    def _run(self, pool: list[tuple[Job, int]]) -> None:
        """Run the pool's batches, those of the requests with the least left to do first (the oldest
        request's first when a step passed it over); end the step early when requests arrive."""
        lengths = np.fromiter((job.lengths[i] for job, i in pool), dtype=np.int64, count=len(pool))
        batches = [[pool[k] for k in batch.tolist()] for batch in self.engine.batches(lengths, self.max_num_tokens)]
        left = {job: job.remaining_tokens for job, _ in pool}  # tokens not in this pool, then those in it
        for job, index in pool:
            left[job] += int(job.lengths[index])
        oldest = min(left, key=lambda job: job.arrived)
        batches.sort(key=lambda batch: min(left[job] for job, _ in batch))
        if oldest is self._passed_over:  # the last step ended before a batch of the oldest request: one goes first
            first = next(k for k, batch in enumerate(batches) if any(job is oldest for job, _ in batch))
            batches.insert(0, batches.pop(first))
        oldest_ran = False
        for position, batch in enumerate(batches):
            self._run_batch(batch)
            oldest_ran = oldest_ran or any(job is oldest for job, _ in batch)
            later = batches[position + 1 :]
            if later and self._arrived:
                for job, index in (member for b in later for member in b):
                    job.give_back([index])
                break
        self._passed_over = None if oldest_ran else oldest

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        live = [(job, i) for job, i in batch if not job.dropped]
        if not live:
            return
        started = time.perf_counter()
        for job, _ in live:
            if job.started is None:
                job.started = started
                self._observe_queue(started - job.arrived)
        try:
            scores = self.engine.classify([job.sequences[i] for job, i in live], any(j.keep_logits for j, _ in live))
        except Exception as error:  # an engine fault fails this batch's requests only
            log.warning("engine failure on a batch of %d sequences: %s: %s", len(live), type(error).__name__, error)
            failure = EngineFailure(f"engine failure: {type(error).__name__}: {error}")
            self._ran(live)
            for job in {job for job, _ in live}:
                job.settle(failure)
            return
        seconds = time.perf_counter() - started
        lengths = [int(job.lengths[i]) for job, i in live]
        real = sum(lengths)
        self._observe_batch(len(live), real, len(live) * max(lengths) if self.engine.padded else real, seconds)
        row = 0
        for (job, i), length in zip(live, lengths, strict=True):
            job.out.put(slice(int(job.rows[i]), int(job.rows[i]) + length), scores.take(slice(row, row + length)))
            row += length
        for job in self._ran(live):
            with self._lock:
                self._active.remove(job)
            job.settle(None)

    def _ran(self, live: list[tuple[Job, int]]) -> list[Job]:
        """Count the batch's sequences as run; the jobs it finished."""
        with self._lock:
            self._queued_sequences -= len(live)
        finished = []
        for job, _ in live:
            job.unfinished -= 1
            if job.unfinished == 0:
                finished.append(job)
        return finished
