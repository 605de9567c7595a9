"""The orchestration: rows packed into requests, kept in flight, written back in input order.

Requests complete in any order; their answers wait until every earlier row is written, so the output
keeps the input's order and holds each row exactly once. At most `target.window` requests are out at
a time (each at most `Packing.rows` rows), which bounds memory whatever the input's size. The writer
commits about every `commit_every_s` seconds; on the way out (done, a target that stays unreachable,
Ctrl-C) what was written is committed, so a rerun goes on from there. Rows are only written with their
answers or their own errors: a target that fails them past its retries raises Unreachable, and the
rows from the first one so failed on are left for the rerun."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from .outputs import Writer
from .progress import Progress
from .rows import Outcome, Row, Selection, estimated_tokens


class Target(Protocol):
    """A way to run the model: HttpTarget, LocalTarget, RayTarget."""

    retries: Counter[str]

    @property
    def window(self) -> int:
        """Requests the runner keeps out at once."""
        ...

    async def model(self) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any] | None:
        """The model's /info (labels included), or None where a deployment does not route it."""
        ...

    async def answer(self, texts: list[str]) -> list[Outcome]: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Packing:
    """A request holds rows until their estimated tokens would pass `tokens`, or `rows` of them."""

    tokens: int
    rows: int


#: over HTTP: a request the server answers in a few engine batches, many of them in flight
HTTP_PACKING = Packing(4096, 256)
#: in process and on an actor: two requests at a time, each large, so the engine batches texts of like
#: lengths together (less padding); 1024 rows is the service's max_texts default
ENGINE_PACKING = Packing(16384, 1024)


@dataclasses.dataclass
class Chunk:
    rows: list[Row]
    tokens: int


def chunks(rows: Iterable[Row], packing: Packing) -> Iterator[Chunk]:
    """Consecutive rows packed by estimated tokens (a row with an error rides along, answered by it)."""
    current: list[Row] = []
    tokens = 0
    for row in rows:
        size = estimated_tokens(row.text) if row.text is not None else 0
        if current and (tokens + size > packing.tokens or len(current) >= packing.rows):
            yield Chunk(current, tokens)
            current, tokens = [], 0
        current.append(row)
        tokens += size
    if current:
        yield Chunk(current, tokens)


async def _answer(target: Target, chunk: Chunk) -> list[Outcome]:
    texts = [row.text for row in chunk.rows if row.error is None and row.text is not None]
    answers = iter(await target.answer(texts) if texts else [])
    return [row.error if row.error is not None else next(answers) for row in chunk.rows]


async def tag(
    rows: Iterable[Row],
    target: Target,
    writer: Writer,
    progress: Progress,
    packing: Packing,
    commit_every_s: float,
    selection: Selection | None = None,
) -> None:
    """Every row through `target` into `writer`, in order, its entities those `selection` keeps (every
    format writes the same ones); raises what the target raises (Unreachable)."""
    selection = selection or Selection()
    source = chunks(rows, packing)
    pending: deque[tuple[Chunk, asyncio.Task[list[Outcome]]]] = deque()
    committed_at = time.monotonic()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < target.window:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                else:
                    pending.append((chunk, asyncio.ensure_future(_answer(target, chunk))))
            if not pending:
                break
            await asyncio.wait([pending[0][1]])  # the oldest: rows are written in order (a failure raises below)
            while pending and pending[0][1].done():
                chunk, task = pending.popleft()
                outcomes = [selection(outcome) for outcome in task.result()]
                writer.add(chunk.rows, outcomes)
                progress.update(outcomes, chunk.tokens)
            if writer.pending() and time.monotonic() - committed_at >= commit_every_s:
                writer.commit()
                committed_at = time.monotonic()
    finally:
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        writer.commit(stopping=True)
