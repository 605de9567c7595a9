"""The server as processes: a supervisor, one engine process, front-end workers.

Real processes and real signals: one /metrics scrape counts every worker's requests; a worker killed
outright is replaced and the server keeps answering; an engine process killed outright turns /health
to 503 and ends the server with a non-zero status naming it; a bad setting ends it at once. Beside
them, the engine-process scheduler's fairness (a sentence does not wait for a whole document) on the
real ONNX Runtime engine, and the refused-body drain read by urllib, requests and httpx."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import httpx
import pytest
import requests

import corpus
from conftest import ROOT, ServerProcess, record
from nerserve.config import Settings


def served_by(process: ServerProcess, route: str = "/predict_tokens") -> Counter:
    """Requests per worker pid, from the server's one log line per request."""
    lines = re.findall(r'"worker":(\d+),"method":"POST","path":"' + re.escape(route), process.output(tail=None))
    return Counter(int(pid) for pid in lines)


def counted(metrics: str, route: str = "/predict_tokens", status: str = "200") -> float:
    match = re.search(rf'nerserve_requests_total{{route="{re.escape(route)}",status="{status}"}} ([0-9.e+]+)', metrics)
    return float(match.group(1)) if match else 0.0


def test_one_scrape_counts_every_workers_requests(server) -> None:
    before = counted(httpx.get(server.url + "/metrics").text)
    answered_before = served_by(server)  # the server is shared: only this test's requests count
    sent = 0

    def client() -> None:
        nonlocal sent
        for text in corpus.texts()[:10]:  # a new connection each time: the kernel hands them to either worker
            with httpx.Client() as fresh:
                assert fresh.post(server.url + "/predict_tokens", json={"inputs": [text]}).status_code == 200
            sent += 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_worker = served_by(server) - answered_before
    assert len(by_worker) == 2, f"both workers should have answered: {by_worker}"
    assert counted(httpx.get(server.url + "/metrics").text) - before == sent == 60
    record(f"processes: one /metrics scrape counted {sent} requests answered by workers {dict(by_worker)}")


def test_a_worker_killed_outright_is_replaced(server) -> None:
    workers = [int(pid) for pid in re.findall(r"worker (\d+) connected", server.output(tail=None))]
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        connected = [int(pid) for pid in re.findall(r"worker (\d+) connected", server.output(tail=None))]
        if len(connected) > len(workers):
            break
        time.sleep(0.2)
    assert f"worker {victim} exited (status -9); starting another" in server.output(tail=None)
    assert connected[-1] not in workers
    server.wait_ready()
    answers = [
        httpx.post(server.url + "/predict_tokens", json={"inputs": [t]}).status_code for t in corpus.texts()[:20]
    ]
    assert answers == [200] * 20


def test_an_engine_process_killed_outright_ends_the_server(built) -> None:
    """The workers answer 503 through their drain (the default grace) while the server ends, status 1."""
    settings = {"CHECKPOINT": str(built("wordpiece-cased")), "ENGINE": "onnxruntime", "WORKERS": "2"}
    process = ServerProcess({**settings, "SHUTDOWN_GRACE_S": str(Settings().shutdown_grace_s)})
    process.wait_ready()
    engine = int(re.search(r"engine process (\d+) loading", process.output(tail=None)).group(1))
    os.kill(engine, signal.SIGKILL)
    statuses = []
    while process.process.poll() is None:
        try:
            statuses.append(httpx.get(process.url + "/health", timeout=2).status_code)
        except httpx.HTTPError:
            statuses.append("refused")
        time.sleep(0.05)
    assert process.process.returncode == 1 and 503 in statuses and 200 not in statuses[statuses.index(503) :]
    assert process.output().strip().splitlines()[-1] == "nerserve: the engine process exited (status -9)"


def test_a_setting_that_cannot_work_ends_the_server_at_once(built) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "nerserve", "serve"],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT / "packages"),
            "NERSERVE_CHECKPOINT": str(built("wordpiece-cased")),
            "NERSERVE_WINDOW_STRIDE": "600",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and time.monotonic() - started < 60
    assert last.startswith("nerserve: cannot load the model: ValueError: window_stride 600 must be less than"), last
    bad = subprocess.run(
        [sys.executable, "-m", "nerserve", "serve"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "packages"), "NERSERVE_ENGINE": "tensorflow"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "nerserve: cannot start: engine must be one of auto, tensorrt, torch, onnxruntime, not 'tensorflow'"
    )


@pytest.mark.parametrize("client", ["urllib", "requests", "httpx"])
def test_every_client_reads_the_413(server, client) -> None:
    """A body over the limit is refused before it is read; the server reads and drops it anyway (up to a
    bound), so clients that send the whole body before reading the answer get the 413, not a reset."""
    body = json.dumps({"inputs": ["word " * 1_200_000]}).encode()  # 6 MB, over the 4 MiB default
    url = server.url + "/predict_tokens"
    answers: Counter = Counter()
    for _ in range(20):
        try:
            if client == "urllib":
                request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
                try:
                    urllib.request.urlopen(request, timeout=30)
                except urllib.error.HTTPError as error:
                    answers[(error.code, json.loads(error.read())["error_type"])] += 1
            elif client == "requests":
                response = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=30)
                answers[(response.status_code, response.json()["error_type"])] += 1
            else:
                response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
                answers[(response.status_code, response.json()["error_type"])] += 1
        except OSError as error:  # a reset, what this test exists to rule out
            answers[type(error).__name__] += 1
    assert answers == {(413, "Validation"): 20}, answers
    assert httpx.post(url, json={"inputs": "still up"}).status_code == 200
