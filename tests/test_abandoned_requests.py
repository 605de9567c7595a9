"""Requests abandoned mid-flight (a client SIGKILLed, as a killed `nerserve tag` job leaves them) must not
touch later requests: the worker keeps each one's arena block until the engine process says it is done
with it. Before that was so, cancelling the request's task also cancelled the future it awaited, the
block was freed at once, and the next requests' token ids and scores went through memory the engine was
still reading and writing (ONNX Runtime refusing ids such as 1058967067, the bits of a probability; or
other texts' entities)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from conftest import CONLL_DEV, ROOT, ServerProcess, real_checkpoint
from nerserve.evaluation.gold import read_conll


def conll_sentences(count: int) -> list[str]:
    return [" ".join(words) for words, _ in read_conll(CONLL_DEV, count)]


def spans(items: list[dict]) -> list[tuple]:
    return [(item["start"], item["end"], item["token"], list(item["results"])) for item in items]


def close(a: dict, b: dict) -> bool:
    """Scores to 1e-5 (batches of other shapes round differently)."""
    return all(abs(a["results"][label] - b["results"][label]) < 1e-5 for label in a["results"])


def test_a_killed_job_leaves_the_servers_later_answers_right(tmp_path: Path) -> None:
    """A tag job SIGKILLed with requests at the engine, then the same requests again: all 200 and equal to
    the answers before. On the real checkpoint and CoNLL dev sentences: the test checkpoints answer
    before the kill lands."""
    checkpoint = real_checkpoint()
    sentences = conll_sentences(640)
    chunks = [sentences[i : i + 32] for i in range(0, len(sentences), 32)]
    server = ServerProcess({"CHECKPOINT": str(checkpoint), "ENGINE": "onnxruntime", "SHUTDOWN_GRACE_S": "0.1"})
    server.wait_ready()
    try:

        async def answers() -> list[tuple[int, list]]:
            limit = asyncio.Semaphore(8)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

                async def one(chunk: list[str]) -> tuple[int, list]:
                    async with limit:
                        response = await client.post("/predict_tokens", json={"inputs": chunk})
                    return response.status_code, response.json()

                return await asyncio.gather(*(one(chunk) for chunk in chunks))

        before = asyncio.run(answers())
        assert all(status == 200 for status, _ in before)
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps({"text": text}) + b"\n" for text in sentences))
        command = [sys.executable, "-m", "nerserve", "tag", str(source), "-o", str(tmp_path / "out.jsonl")]
        job = subprocess.Popen(
            [*command, "--url", server.url, "--batch-rows", "32"],
            env={**os.environ, "PYTHONPATH": str(ROOT / "packages")},
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.6)  # its first requests at the engine
        job.send_signal(signal.SIGKILL)
        job.wait()
        after = asyncio.run(answers())
        assert [status for status, _ in after] == [200] * len(chunks), [
            body for status, body in after if status != 200
        ][:1]
        for (_, got), (_, want) in zip(after, before, strict=True):
            assert [spans(items) for items in got] == [spans(items) for items in want]
            assert all(close(a, b) for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True))
    finally:
        server.stop()
