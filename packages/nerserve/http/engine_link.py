"""A front-end worker's side of the link to the engine process (transport.py says how the two talk).

`connect` is blocking (run it in a thread): it reaches the engine process's socket, hands over this
worker's arena, and waits until the engine process has loaded its model and sends what the worker
needs (tokenizer, labels, /info). After that, everything runs on the worker's event loop: `score`
writes a request's token ids into the arena, sends SUBMIT, and awaits the DONE that the socket's
reader callback turns into the request's future; the scores are read in place, and the block is given
back when the caller is done with them. A request given up (timeout, client gone) is cancelled at
the engine, and its block is kept until the engine's DONE says nothing more will be written to it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from multiprocessing import reduction
from multiprocessing.connection import Client, Connection

import numpy as np

from ..errors import ApiError, Busy, PayloadTooLarge, Unhealthy
from ..scores import TokenScores
from ..transport import DONE, Arena, Block, Hello, Setup, Submit, decode, decode_handshake, encode_cancel

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Request:
    offset: int
    size: int
    future: asyncio.Future[None]
    abandoned: bool = False  # given up by its caller: release the block on DONE


class EngineLink:
    """One worker's connection to the engine process."""

    def __init__(self, address: str, authkey: bytes, arena_bytes: int | None = None) -> None:
        self.address, self.authkey = address, authkey
        self.arena = Arena(arena_bytes) if arena_bytes else Arena()
        self.connection: Connection | None = None
        self.alive = False
        self._pending: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_labels = 0

    def connect(self, timeout: float = 3600.0) -> Setup:
        """Reach the engine process and wait for its model (blocking; minutes while a model downloads)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                connection = Client(self.address, family="AF_UNIX", authkey=self.authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        connection.send_bytes(Hello(os.getpid()).encode())
        reduction.send_handle(connection, self.arena.fd, 0)
        setup = decode_handshake(connection.recv_bytes(), Setup)
        self.connection = connection
        self.num_labels = len(setup.labels)
        return setup

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's answers on `loop` from now on."""
        assert self.connection is not None
        self._loop = loop
        self.alive = True
        loop.add_reader(self.connection.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self.connection is not None
        try:
            while self.connection.poll():
                kind, payload = decode(self.connection.recv_bytes())
                if kind == DONE:
                    self._done(*payload)  # type: ignore[misc]
        except (EOFError, OSError):
            self._engine_gone()

    def _done(self, job_id: int, error: ApiError | None) -> None:
        request = self._pending.pop(job_id, None)
        if request is None:
            return
        if request.abandoned:
            self._release(request)
        elif not request.future.done():
            if error is None:
                request.future.set_result(None)
            else:
                request.future.set_exception(error)

    def _engine_gone(self) -> None:
        """The engine process went away: every request in flight fails, and so will every new one."""
        if not self.alive:
            return
        self.alive = False
        assert self._loop is not None and self.connection is not None
        self._loop.remove_reader(self.connection.fileno())
        log.error("the engine process went away; %d requests in flight fail", len(self._pending))
        for request in self._pending.values():
            if not request.future.done():
                request.future.set_exception(Unhealthy("the engine process exited"))
        self._pending.clear()

    def _release(self, request: _Request) -> None:
        self.arena.release(request.offset, request.size)

    def _allocate(self, size: int) -> int:
        """A block of the arena; Busy when the requests in flight hold the space it needs."""
        if size > self.arena.size:
            raise PayloadTooLarge(
                f"the request needs {size / 2**20:.1f} MiB of transport space; the most is "
                f"{self.arena.size / 2**20:.1f} MiB (arena_bytes)"
            )
        offset = self.arena.allocate(size)
        if offset is None:
            raise Busy(
                f"this worker's transport space is full of requests in flight ({len(self._pending)}); retry shortly"
            )
        return offset

    async def score(self, sequences: list[np.ndarray], keep_logits: bool) -> TokenScores:
        """The engine's scores of `sequences`, copied out of the arena (8 bytes a token, and the logits
        where asked), so the block is free again before aggregation starts."""
        if not self.alive or self.connection is None:
            raise Unhealthy("the engine process is not running")
        tokens = sum(len(s) for s in sequences)
        size = Block.size(len(sequences), tokens, self.num_labels, keep_logits)
        offset = self._allocate(size)
        block = Block.at(self.arena.buffer, offset, len(sequences), tokens, self.num_labels, keep_logits)
        block.lengths[:] = [len(s) for s in sequences]
        if tokens:
            np.concatenate(sequences, out=block.ids, casting="unsafe")  # int64 ids -> int32
        job_id = next(self._ids)
        request = _Request(offset, size, asyncio.get_running_loop().create_future())
        self._pending[job_id] = request
        self.connection.send_bytes(Submit(job_id, len(sequences), tokens, offset, keep_logits).encode())
        try:
            await request.future
        except asyncio.CancelledError:
            # Cancelling this task cancels the future it awaits, so the future's state cannot say whether the
            # engine has answered; its DONE taking the request out of `_pending` can.
            if job_id not in self._pending or not self.alive:  # the engine has answered (or is gone)
                self._release(request)
            else:  # the engine may write the block until its DONE for the cancel
                request.abandoned = True
                self.connection.send_bytes(encode_cancel(job_id))
            raise
        except BaseException:
            self._release(request)
            raise
        scores = block.scores.copy()
        self._release(request)
        return scores
