"""How front-end workers and the engine process exchange requests: arrays through shared memory, a
light signal beside them.

Each worker owns an arena: an anonymous shared-memory file (memfd: no name, nothing left behind when
a process dies, not bounded by a container's small /dev/shm) that it maps and hands to the engine
process once, as a file descriptor over their Unix socket. A request is one block of the arena:

    lengths u32[n] | token ids i32[T] | labels i32[T] | probabilities f32[T] | logits f32[T, L] (if asked)

The worker writes lengths and ids and sends a 26-byte SUBMIT message naming the block; the engine
process reads the ids in place, writes labels, probabilities (and logits) in place, and answers a
10-byte DONE (or an error). So a request crosses processes without pickling or copying its arrays
through a pipe (`bench/transport.py` measures the two). The block stays the worker's: it is reused
only after the engine's DONE, the promise that the engine will not write it again.

Messages go over `multiprocessing.connection` (length-prefixed frames on a Unix socket). First the
handshake, once per worker:
    Hello (pickled)                                                    worker -> engine: its pid
    the arena's file descriptor (SCM_RIGHTS)                           worker -> engine
    Setup (pickled), once the model is loaded                          engine -> worker: tokenizer, labels, /info
then, per request:
    S job_id:u64 sequences:u32 tokens:u32 offset:u64 keep_logits:u8   worker -> engine
    C job_id:u64                                                       worker -> engine: cancel
    D job_id:u64 status:u8 [pickled ApiError when status is 1]         engine -> worker"""

from __future__ import annotations

import bisect
import dataclasses
import mmap
import os
import pickle
import struct
from typing import Any, TypeVar

import numpy as np

from .errors import ApiError
from .scores import TokenScores
from .text.tokenization import TextTokenizer

SUBMIT, CANCEL, DONE = b"S", b"C", b"D"
_SUBMIT = struct.Struct("<QIIQB")
_CANCEL = struct.Struct("<Q")
_DONE = struct.Struct("<QB")
OK, FAILED = 0, 1
ALIGN = 64
#: each worker's arena: virtual size (pages are taken only as requests touch them, and given back after
#: large ones). The largest request a 4 MiB body can make (a token per byte, windows overlapping, 9
#: labels' logits) needs about 260 MiB; one that would not fit is refused with 413.
ARENA_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Hello:
    """The worker's first message: who it is (the engine process logs it and cancels its jobs when it goes)."""

    pid: int

    def encode(self) -> bytes:
        return pickle.dumps(self)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the engine process sends a worker once its model is ready: all it needs to tokenize,
    aggregate and answer /info on its own."""

    tokenizer: TextTokenizer
    labels: tuple[str, ...]
    info: dict[str, Any]

    def encode(self) -> bytes:
        return pickle.dumps(self)


Handshake = TypeVar("Handshake", Hello, Setup)


def decode_handshake(message: bytes, kind: type[Handshake]) -> Handshake:
    """A Hello or Setup from its bytes, refusing anything else (a peer of another version)."""
    value = pickle.loads(message)
    if not isinstance(value, kind):
        raise ValueError(f"expected a {kind.__name__} in the handshake, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Submit:
    job_id: int
    sequences: int
    tokens: int
    offset: int
    keep_logits: bool

    def encode(self) -> bytes:
        return SUBMIT + _SUBMIT.pack(self.job_id, self.sequences, self.tokens, self.offset, self.keep_logits)


def encode_cancel(job_id: int) -> bytes:
    return CANCEL + _CANCEL.pack(job_id)


def encode_done(job_id: int, error: ApiError | None) -> bytes:
    if error is None:
        return DONE + _DONE.pack(job_id, OK)
    return DONE + _DONE.pack(job_id, FAILED) + pickle.dumps(error)


def decode(message: bytes) -> tuple[bytes, object]:
    """(kind, payload): a Submit, a cancelled job id, or (job id, error or None) for DONE."""
    kind, body = message[:1], memoryview(message)[1:]
    if kind == SUBMIT:
        job_id, sequences, tokens, offset, keep = _SUBMIT.unpack(body)
        return kind, Submit(job_id, sequences, tokens, offset, bool(keep))
    if kind == CANCEL:
        return kind, _CANCEL.unpack(body)[0]
    if kind == DONE:
        job_id, status = _DONE.unpack_from(body)
        return kind, (job_id, pickle.loads(body[_DONE.size :]) if status == FAILED else None)
    raise ValueError(f"unknown message kind {kind!r}")


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class Block:
    """The arrays of one request inside an arena, as numpy views."""

    lengths: np.ndarray  # u32 [n]
    ids: np.ndarray  # i32 [T]
    scores: TokenScores  # [T], written by the engine

    @staticmethod
    def size(sequences: int, tokens: int, num_labels: int, keep_logits: bool) -> int:
        parts = [4 * sequences, 4 * tokens, 4 * tokens, 4 * tokens, 4 * tokens * num_labels if keep_logits else 0]
        return sum(_aligned(part) for part in parts)

    @classmethod
    def at(cls, buffer: mmap.mmap, offset: int, sequences: int, tokens: int, num_labels: int, keep: bool) -> Block:
        """Views of the block at `offset` (the same layout on both sides)."""
        arrays = []
        for dtype, count in ((np.uint32, sequences), (np.int32, tokens), (np.int32, tokens), (np.float32, tokens)):
            arrays.append(np.frombuffer(buffer, dtype=dtype, count=count, offset=offset))
            offset += _aligned(4 * count)
        logits = (
            np.frombuffer(buffer, np.float32, tokens * num_labels, offset).reshape(tokens, num_labels) if keep else None
        )
        return cls(arrays[0], arrays[1], TokenScores(arrays[2], arrays[3], logits))

    def sequences(self) -> list[np.ndarray]:
        """The token id sequences, as views of the block."""
        return np.split(self.ids, np.cumsum(self.lengths[:-1], dtype=np.int64)) if len(self.lengths) else []


class Arena:
    """A worker's shared memory and its allocator (first fit over a sorted free list, coalescing)."""

    def __init__(self, size: int = ARENA_BYTES) -> None:
        self.size = size
        self.fd = os.memfd_create("nerserve-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.buffer = mmap.mmap(self.fd, size)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset

    def allocate(self, size: int) -> int | None:
        """Offset of a block of at least `size` bytes, or None when no free run is that long now."""
        size = _aligned(max(size, 1))
        for index, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, free - size)
                return offset
        return None

    def release(self, offset: int, size: int) -> None:
        """Give a block back; large ones also give their pages back to the system."""
        size = _aligned(max(size, 1))
        if size >= 1 << 22:
            self.buffer.madvise(mmap.MADV_REMOVE, offset, size)
        index = bisect.bisect(self._free, (offset, size))
        self._free.insert(index, (offset, size))
        if index + 1 < len(self._free) and offset + size == self._free[index + 1][0]:  # merge with the next
            self._free[index] = (offset, size + self._free.pop(index + 1)[1])
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:  # and the previous
            previous = self._free.pop(index - 1)
            self._free[index - 1] = (previous[0], previous[1] + self._free[index - 1][1])
