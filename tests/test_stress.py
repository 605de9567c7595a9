"""`make stress`: 64 concurrent clients for 60 s of mixed lengths and strategies against a real server.

Every request is answered; each answer equals the same request sent alone; the only errors allowed
are 429s; the server's memory (all its processes) is flat: its resident size at the end is within 10% + 32 MiB of what
it was after WARMUP seconds of the same load (ONNX Runtime's arena grows to the largest concurrent
batch in the first seconds and keeps it; a leak keeps growing). Longer fuzzing runs here too."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import corpus
from conftest import ServerProcess, record

pytestmark = pytest.mark.stress
CLIENTS = int(os.environ.get("STRESS_CLIENTS", "64"))
SECONDS = float(os.environ.get("STRESS_SECONDS", "60"))
WARMUP = 15.0  # seconds into the load when the baseline resident size is taken


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the supervisor, its engine process, workers)."""
    total, children = 0, [pid]
    while children:
        current = children.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
            for task in Path(f"/proc/{current}/task").iterdir():
                children += [int(child) for child in (task / "children").read_text().split()]
    return total


def requests_mix(seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    texts = corpus.texts()
    bodies = []
    for _ in range(60):
        size = rng.choice([1, 1, 2, 8, 32])
        body = {
            "inputs": rng.sample(texts, size),
            "aggregation_strategy": rng.choice(["none", "simple", "first", "average", "max"]),
            "truncate": rng.random() < 0.5,
        }
        bodies.append(body)
    return bodies


def same_answer(got: list, want: list, tolerance: float = 1e-4) -> bool:
    """Equal tokens, spans and labels; scores equal up to float noise (batch padding differs under load)."""
    if len(got) != len(want):
        return False
    for text_got, text_want in zip(got, want, strict=True):
        if len(text_got) != len(text_want):
            return False
        for a, b in zip(text_got, text_want, strict=True):
            if {k: v for k, v in a.items() if k != "results"} != {k: v for k, v in b.items() if k != "results"}:
                return False
            if list(a["results"]) != list(b["results"]) or any(
                abs(a["results"][k] - b["results"][k]) > tolerance for k in a["results"]
            ):
                return False
    return True


def test_load_64_clients_mixed(built) -> None:
    process = ServerProcess(
        {"CHECKPOINT": str(built("wordpiece-cased")), "ENGINE": "onnxruntime", "QUEUE_SIZE": "512", "WORKERS": "2"}
    )
    process.wait_ready()
    try:
        bodies = requests_mix()
        with httpx.Client(base_url=process.url, timeout=120) as client:
            alone = [client.post("/predict_tokens", json=b).json() for b in bodies]
        idle = rss_bytes(process.process.pid)
        results: list[tuple[int, bool]] = []
        started = time.time()
        deadline = started + SECONDS

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=process.url, timeout=120) as client:
                while time.time() < deadline:
                    index = rng.randrange(len(bodies))
                    response = client.post(
                        "/predict_tokens",
                        content=json.dumps(bodies[index]),
                        headers={"content-type": "application/json"},
                    )
                    equal = response.status_code == 200 and same_answer(response.json(), alone[index])
                    results.append((response.status_code, equal))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, started + WARMUP - time.time()))
        warm = rss_bytes(process.process.pid)
        for thread in threads:
            thread.join()
        after = rss_bytes(process.process.pid)
        statuses = Counter(status for status, _ in results)
        unequal = sum(1 for status, equal in results if status == 200 and not equal)
        record(
            f"load: {CLIENTS} clients x {SECONDS:.0f}s: {len(results)} requests, by status "
            f"{dict(sorted(statuses.items()))}, {unequal} answers unequal to the request alone; "
            f"RSS {idle / 2**20:.0f} MiB idle, {warm / 2**20:.0f} MiB after {WARMUP:.0f}s of load, "
            f"{after / 2**20:.0f} MiB at the end"
        )
        assert set(statuses) <= {200, 429} and statuses[200] > CLIENTS, statuses
        assert unequal == 0
        assert after <= warm * 1.10 + 32 * 2**20, (warm, after)
    finally:
        assert process.stop(), process.output()
