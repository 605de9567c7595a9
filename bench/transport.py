"""How a request's arrays cross from a worker to the engine process and back: the measurement behind
transport.py's choice (shared memory for the arrays, a small message beside them).

An echo "engine" process answers each request with labels and probabilities (and, where asked, 9 logits
a token), as the real one does; only the crossing is timed, worker side, round trip:
- shared memory: the arena and messages of nerserve.transport (ids written in place, 26-byte SUBMIT,
  the answer written in place, 10-byte DONE, scores copied out);
- bytes: the arrays themselves through the same Unix socket (`send_bytes` both ways);
- pickle: numpy arrays through `Connection.send`/`recv`, what multiprocessing does by default.
Sizes: one sentence (25 tokens), 64 sentences (1,600), 8 paragraphs (3,000), a document (30,000).

    PYTHONPATH=packages .venv/bin/python bench/transport.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import time
from multiprocessing import reduction

import numpy as np

from nerserve.scores import TokenScores
from nerserve.transport import CANCEL, SUBMIT, Arena, Block, Submit, decode, encode_done

LABELS = 9
SIZES = {"1 sentence": (1, 25), "64 sentences": (64, 1600), "8 paragraphs": (8, 3000), "a document": (60, 30000)}


def _answer(ids: np.ndarray, keep: bool) -> TokenScores:
    return TokenScores(
        np.zeros(len(ids), np.int32),
        np.ones(len(ids), np.float32),
        np.zeros((len(ids), LABELS), np.float32) if keep else None,
    )


def _engine(connection) -> None:
    """The echo engine: one message kind per transport."""
    arena = None
    while True:
        message = connection.recv_bytes()
        if message == b"arena":
            fd = reduction.recv_handle(connection)
            arena = mmap.mmap(fd, 0)
        elif message == b"stop":
            return
        elif message[:1] == SUBMIT:
            _, submit = decode(message)
            block = Block.at(arena, submit.offset, submit.sequences, submit.tokens, LABELS, submit.keep_logits)
            block.scores.put(slice(None), _answer(block.ids, submit.keep_logits))
            connection.send_bytes(encode_done(submit.job_id, None))
        elif message[:1] == CANCEL:  # pickle: the arrays come in the next message
            ids, lengths, keep = connection.recv()
            scores = _answer(ids, keep)
            connection.send((scores.labels, scores.probs, scores.logits))
        else:  # bytes: ids then the answer's bytes
            keep = message[0] == 1
            ids = np.frombuffer(connection.recv_bytes(), np.int32)
            scores = _answer(ids, keep)
            connection.send_bytes(
                scores.labels.tobytes() + scores.probs.tobytes() + (scores.logits.tobytes() if keep else b"")
            )


def shared_memory(connection, arena: Arena, sequences: list[np.ndarray], keep: bool) -> TokenScores:
    tokens = sum(len(s) for s in sequences)
    size = Block.size(len(sequences), tokens, LABELS, keep)
    offset = arena.allocate(size)
    block = Block.at(arena.buffer, offset, len(sequences), tokens, LABELS, keep)
    block.lengths[:] = [len(s) for s in sequences]
    np.concatenate(sequences, out=block.ids, casting="unsafe")
    connection.send_bytes(Submit(1, len(sequences), tokens, offset, keep).encode())
    decode(connection.recv_bytes())
    scores = block.scores.copy()
    arena.release(offset, size)
    return scores


def plain_bytes(connection, sequences: list[np.ndarray], keep: bool) -> TokenScores:
    ids = np.concatenate(sequences).astype(np.int32)
    connection.send_bytes(bytes([keep]))
    connection.send_bytes(ids.tobytes())
    answer = connection.recv_bytes()
    n = len(ids)
    labels = np.frombuffer(answer, np.int32, n).copy()
    probs = np.frombuffer(answer, np.float32, n, 4 * n).copy()
    logits = np.frombuffer(answer, np.float32, n * LABELS, 8 * n).reshape(n, LABELS).copy() if keep else None
    return TokenScores(labels, probs, logits)


def pickled(connection, sequences: list[np.ndarray], keep: bool) -> TokenScores:
    connection.send_bytes(CANCEL)
    connection.send((np.concatenate(sequences).astype(np.int32), [len(s) for s in sequences], keep))
    return TokenScores(*connection.recv())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    worker_end, engine_end = context.Pipe()
    engine = context.Process(target=_engine, args=(engine_end,))
    engine.start()
    arena = Arena()
    worker_end.send_bytes(b"arena")
    reduction.send_handle(worker_end, arena.fd, engine.pid)
    rng = np.random.default_rng(0)
    print("| request | logits | shared memory µs | bytes µs | pickle µs |\n| --- | --- | ---: | ---: | ---: |")
    for name, (count, tokens) in SIZES.items():
        sequences = [rng.integers(0, 30000, tokens // count).astype(np.int64) for _ in range(count)]
        for keep in (False, True):
            row = []
            for transport in (
                lambda s=sequences, k=keep: shared_memory(worker_end, arena, s, k),
                lambda s=sequences, k=keep: plain_bytes(worker_end, s, k),
                lambda s=sequences, k=keep: pickled(worker_end, s, k),
            ):
                repeat = max(args.repeat * 25 // tokens, 20)
                transport()
                started = time.perf_counter()
                for _ in range(repeat):
                    transport()
                row.append(1e6 * (time.perf_counter() - started) / repeat)
            logits = "yes" if keep else "no"
            print(f"| {name} ({tokens} tokens) | {logits} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} |", flush=True)
    worker_end.send_bytes(b"stop")
    engine.join()


if __name__ == "__main__":
    main()
