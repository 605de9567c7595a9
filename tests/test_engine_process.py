"""The engine process and the workers' side of it, on the real engine process (ONNX Runtime on a
tiny checkpoint). A worker that stops reading: one fake worker submits a thousand jobs and never
reads an answer while a real worker's link asks for one. Before each worker had a sending thread of
its own, the scheduler's thread blocked on the first worker's full socket (about 278 unread answers
fill it) and the other worker waited for ever (issue 24). And a worker whose warm-up the engine
refuses for load tries again until it is warm, instead of staying unhealthy for ever."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from multiprocessing import reduction
from multiprocessing.connection import Client

import numpy as np
import pytest

from nerserve.config import Settings
from nerserve.engine.process import serve_engine
from nerserve.errors import Busy, Overloaded
from nerserve.http.engine_link import EngineLink
from nerserve.http.worker import warm_until_served
from nerserve.schemas import PredictRequest
from nerserve.text.frontend import Frontend
from nerserve.transport import Arena, Block, Hello, Setup, Submit, decode_handshake


@pytest.fixture(scope="module")
def engine(built, tmp_path_factory):
    """An engine process on the tiny cased WordPiece checkpoint: (address, authkey)."""
    spawn = multiprocessing.get_context("spawn")
    address, authkey = str(tmp_path_factory.mktemp("engine") / "engine.sock"), os.urandom(16)
    status_read, status_write = spawn.Pipe(duplex=False)
    settings = Settings(checkpoint=str(built("wordpiece-cased")), engine="onnxruntime", log_level="WARNING")
    process = spawn.Process(target=serve_engine, args=(settings, address, authkey, status_write, None), daemon=True)
    process.start()
    assert status_read.poll(120), "the engine process did not report"
    state, detail = status_read.recv()
    assert state == "ready", detail
    yield address, authkey
    process.kill()
    process.join()


def test_a_worker_that_stops_reading_stalls_no_other_worker(engine) -> None:
    address, authkey = engine
    stuck = Client(address, family="AF_UNIX", authkey=authkey)
    stuck.send_bytes(Hello(os.getpid()).encode())
    arena = Arena(1 << 20)
    reduction.send_handle(stuck, arena.fd, 0)
    labels = decode_handshake(stuck.recv_bytes(), Setup).labels
    block = Block.at(arena.buffer, 0, 1, 3, len(labels), False)
    block.lengths[:] = [3]
    block.ids[:] = [2, 5, 3]
    for job_id in range(1, 1001):  # every job names the same block: the engine writes the same scores
        stuck.send_bytes(Submit(job_id, 1, 3, 0, False).encode())

    link = EngineLink(address, authkey, 1 << 24)
    setup = link.connect(timeout=30)

    async def predict() -> float:
        link.start(asyncio.get_running_loop())
        frontend = Frontend(setup.tokenizer, setup.labels)
        prepared = frontend.prepare(PredictRequest.model_validate({"inputs": "Angela Merkel visited Paris."}))
        await asyncio.sleep(1.0)  # the stuck worker's thousand answers are due by now
        started = time.monotonic()
        scores = await asyncio.wait_for(link.score(prepared.sequences, prepared.keep_logits), 10)
        assert len(frontend.answer(prepared, scores)[0]) == len(np.concatenate(prepared.sequences))
        return time.monotonic() - started

    seconds = asyncio.run(predict())
    assert seconds < 1.0, seconds
    stuck.close()


def test_a_warm_up_refused_for_load_is_tried_again_until_served(engine) -> None:
    """The engine's own refusals (a full queue, a full arena) for the first two tries, then its real
    answer: the worker is warm after the third (before, the first refusal was the worker's failure,
    and /health said 503 for ever)."""
    link = EngineLink(*engine, 1 << 24)
    setup = link.connect(timeout=30)
    refusals: list[Exception] = [Overloaded("queue full"), Busy("arena full")]
    calls = 0

    async def score(sequences: list[np.ndarray], keep_logits: bool):
        nonlocal calls
        calls += 1
        if refusals:
            raise refusals.pop(0)
        return await link.score(sequences, keep_logits)

    async def warm() -> None:
        link.start(asyncio.get_running_loop())
        await asyncio.wait_for(warm_until_served(Frontend(setup.tokenizer, setup.labels), score), 10)

    asyncio.run(warm())
    assert calls == 3 and not refusals
