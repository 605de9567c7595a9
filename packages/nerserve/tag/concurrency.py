"""How many requests the HTTP client keeps in flight: as many as raise the rate of answers, fewer
when the target says it is overloaded.

More requests in flight help until the target is busy; past that they only queue at the server, and
each one costs the client too (its connection, its place in the pool). So the limit climbs the rate
it measures: it doubles while doubling pays (a slow start), then tries one step up (an eighth more)
every few rounds and keeps it only where the answers' rate rose by GAIN; a step that does not pay is
taken back. A round is as many answers as the limit (at least ROUND); the round after a change is not
measured, as its requests were sent under the old limit. 429, 503, 504 and timeouts halve it (at most
once a second, so one burst of refusals is one cut). Many replicas behind one URL answer faster with
more in flight, so the limit climbs to use them all, up to the ceiling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: a step up is kept where the rate rose by this factor
GAIN = 1.05
#: answers in a measured round, at least
ROUND = 8
#: rounds at a level before the next step up is tried (after the slow start)
PROBE_EVERY = 8


class AdaptiveLimit:
    """The limit, its waiters, and the rounds that steer it. `release(work)` after each answer gives
    its size (request bytes), so the rate is work per second whatever the requests' sizes."""

    def __init__(self, start: int, ceiling: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = max(1, min(start, self.ceiling))
        self.clock = clock
        self.in_flight = 0
        self.condition = asyncio.Condition()
        self.slow_start = True
        self.before: tuple[int, float] | None = None  # (limit, rate) before the step being measured
        self.settling = True
        self.rounds_at_level = 0
        self.round_work = self.round_answers = 0
        self.round_started = clock()
        self.cut_at = float("-inf")

    async def acquire(self) -> None:
        async with self.condition:
            await self.condition.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def release(self, work: int | None = None) -> None:
        """A request is done (`work`: its size when it was answered, None when it failed)."""
        async with self.condition:
            self.in_flight -= 1
            if work is not None:
                self._answered(work)
            self.condition.notify_all()

    def cut(self) -> None:
        """The target is overloaded: halve the limit, and climb only by single steps from now on."""
        now = self.clock()
        if now - self.cut_at >= 1.0:
            self.cut_at = now
            self.slow_start = False
            self.before = None
            self._set(max(1, self.limit // 2))

    def _answered(self, work: int) -> None:
        self.round_work += work
        self.round_answers += 1
        if self.round_answers < max(ROUND, self.limit):
            return
        now = self.clock()
        rate = self.round_work / max(1e-9, now - self.round_started)
        self.round_work = self.round_answers = 0
        self.round_started = now
        if self.settling:
            self.settling = False
        else:
            self._step(rate)

    def _step(self, rate: float) -> None:
        """After a measured round: judge the step just taken, or take the next one."""
        if self.before is not None:
            limit, rate_before = self.before
            self.before = None
            if rate < rate_before * GAIN:  # it did not pay: back, and single steps from now on
                self.slow_start = False
                self.rounds_at_level = 0
                self._set(limit)
                return
        self.rounds_at_level += 1
        if self.limit < self.ceiling and (self.slow_start or self.rounds_at_level >= PROBE_EVERY):
            self.before = (self.limit, rate)
            self.rounds_at_level = 0
            self._set(min(self.ceiling, self.limit * 2 if self.slow_start else self.limit + max(1, self.limit // 8)))

    def _set(self, limit: int) -> None:
        self.limit = limit
        self.settling = True
        self.round_work = self.round_answers = 0
        self.round_started = self.clock()
