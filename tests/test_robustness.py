"""Production behaviour over real HTTP: a battery of hostile inputs, fuzzing from /openapi.json, a real
engine fault, a client that disappears, backpressure (429) and timeouts (504), SIGTERM under load.

The fault is real, not mocked: the checkpoint's model has 40 fewer embeddings than its tokenizer
has ids, so ONNX Runtime fails on exactly the batches that hold one of those tokens."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from transformers import AutoTokenizer

import checkpoints
import corpus
from conftest import ServerProcess, record
from nerserve.config import Settings

SHORTFALL = 40


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """(checkpoint path, a text whose tokens include one the model has no embedding for)."""
    path = checkpoints.build("wordpiece-cased", tmp_path_factory.mktemp("faulty"), embedding_shortfall=SHORTFALL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = len(tokenizer) - SHORTFALL
    words = " ".join(corpus.texts()).split()
    poison = next(w for w in words if max(tokenizer(w)["input_ids"]) >= limit)
    safe = [t for t in corpus.texts()[:200] if max(tokenizer(t, truncation=True)["input_ids"]) < limit]
    return path, poison, safe


def post(url: str, body, headers=None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        url + "/predict_tokens",
        content=content,
        timeout=timeout,
        headers={"content-type": "application/json", **(headers or {})},
    )


def hostile_inputs() -> list[tuple[str, bytes, dict, set[int]]]:
    """(name, body, headers, acceptable statuses): every one must be answered, as JSON."""
    cases: list[tuple[str, bytes, dict, set[int]]] = [
        ("not json", b"{inputs: nope", {}, {400}),
        ("empty body", b"", {}, {400}),
        ("wrong content type", b'{"inputs": "a"}', {"content-type": "text/plain"}, {400}),
        ("form content type", b"inputs=a", {"content-type": "application/x-www-form-urlencoded"}, {400}),
        ("invalid utf-8", b'{"inputs": "\xc3\x28"}', {}, {400}),
        ("lone surrogate", b'{"inputs": "a \\ud800 b"}', {}, {400, 422}),
        ("nested three deep", json.dumps({"inputs": [[["a"]]]}).encode(), {}, {422}),
        ("10 MB body", json.dumps({"inputs": ["word " * 2_000_000]}).encode(), {}, {413}),
        ("one 5 MB text", json.dumps({"inputs": "x" * 5_000_000}).encode(), {}, {413}),
        ("100k texts", json.dumps({"inputs": ["a"] * 100_000}).encode(), {}, {413}),
        ("NUL bytes", json.dumps({"inputs": ["Apple\u0000Inc \u0000"]}).encode(), {}, {200}),
        ("control characters", json.dumps({"inputs": ["\u0001\u0002\u001b[31mred\u007f\u0085"]}).encode(), {}, {200}),
        ("only whitespace", json.dumps({"inputs": ["\t\n \r\u3000"]}).encode(), {}, {200}),
        ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, {}, {400, 422}),
        ("huge integer", b'{"inputs": ["a"], "truncate": 1e400}', {}, {400, 422}),
    ]
    for strategy in ("MAX", "Simple", "aVeRaGe", "NONE", "first"):
        cases.append(
            (f"strategy {strategy}", json.dumps({"inputs": "a", "aggregation_strategy": strategy}).encode(), {}, {200})
        )
    for direction in ("LEFT", "right", "Right"):
        cases.append(
            (
                f"direction {direction}",
                json.dumps({"inputs": "a", "truncate": True, "truncation_direction": direction}).encode(),
                {},
                {200},
            )
        )
    wrong_values = [None, 0, -1, -(10**30), 10**30, 3.5, "", "x", [], {}, [1], True]
    for field in ("inputs", "aggregation_strategy", "raw_scores", "truncate", "truncation_direction"):
        for value in wrong_values:
            body = {"inputs": ["a"], field: value}
            valid = (field in ("raw_scores", "truncate") and isinstance(value, bool)) or (
                field == "inputs" and isinstance(value, str)
            )
            cases.append((f"{field}={value!r}"[:40], json.dumps(body).encode(), {}, {200} if valid else {422}))
    return cases


def test_battery_of_hostile_inputs(server) -> None:
    statuses: Counter = Counter()
    for name, body, headers, acceptable in hostile_inputs():
        response = post(server.url, body, headers)
        assert response.status_code in acceptable, f"{name}: {response.status_code} {response.text[:200]}"
        assert response.headers["content-type"] == "application/json", name
        payload = response.json()
        if response.status_code != 200:
            assert set(payload) == {"error", "error_type"} and payload["error"], name
        statuses[response.status_code] += 1
    assert post(server.url, {"inputs": "still up"}).status_code == 200
    record(f"hostile inputs: {sum(statuses.values())} tried, by status {dict(sorted(statuses.items()))}")


def test_nul_and_control_characters_keep_exact_spans(server) -> None:
    text = "Apple\u0000Inc\u0001 and\u001b Google"
    for item in post(server.url, {"inputs": text}).json()[0][1:-1]:
        assert item["token"] == text[item["start"] : item["end"]]


def test_fuzzing_from_openapi(server) -> None:
    """Schemathesis generates conforming and non-conforming bodies from the server's own schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operation = schema["/predict_tokens"]["POST"]
    statuses: Counter = Counter()
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text
        assert response.headers["content-type"] == ["application/json"]
        if response.status_code != 200:
            assert set(response.json()) == {"error", "error_type"}

    fuzz()
    assert statuses[200] > 100 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 100, statuses
    record(f"fuzzing: {sum(statuses.values())} requests from /openapi.json, by status {dict(sorted(statuses.items()))}")


def test_engine_fault_fails_only_its_requests(faulty) -> None:
    path, poison, safe = faulty
    process = ServerProcess({"CHECKPOINT": str(path), "ENGINE": "onnxruntime"})
    try:
        process.wait_ready()
        failed = post(process.url, {"inputs": [f"hello {poison}"]})
        assert failed.status_code == 500 and failed.json()["error_type"] == "Backend"
        assert "engine failure" in failed.json()["error"]
        ok = post(process.url, {"inputs": safe[:50], "aggregation_strategy": "simple"})
        assert ok.status_code == 200 and len(ok.json()) == 50
    finally:
        process.stop()


def test_vanished_client_leaves_no_stuck_work(server) -> None:
    body = json.dumps({"inputs": [corpus.long_text(random.Random(1), 400)] * 200}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /predict_tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.05)
    deadline = time.time() + 60
    while time.time() < deadline:
        metrics = httpx.get(server.url + "/metrics").text
        if "nerserve_queue_depth 0.0" in metrics:
            break
        time.sleep(0.2)
    assert "nerserve_queue_depth 0.0" in metrics
    assert post(server.url, {"inputs": corpus.texts()[:3]}, timeout=10).status_code == 200


def test_backpressure_and_timeouts(built) -> None:
    """A tiny queue refuses whole requests with 429 + Retry-After; a tiny timeout answers 504."""
    process = ServerProcess(
        {
            "CHECKPOINT": str(built("wordpiece-cased")),
            "ENGINE": "onnxruntime",
            "QUEUE_SIZE": "4",
            "REQUEST_TIMEOUT_S": "0.05",
        }
    )
    try:
        process.wait_ready()
        texts = [corpus.long_text(random.Random(i), 300) for i in range(4)]
        seen: Counter = Counter()
        retry_after = set()

        kinds: Counter = Counter()

        def client() -> None:
            response = post(process.url, {"inputs": texts, "truncate": True})
            seen[response.status_code] += 1
            if response.status_code != 200:
                kinds[response.json()["error_type"]] += 1
            if response.status_code == 429:
                retry_after.add(response.headers.get("retry-after"))

        for _ in range(5):
            threads = [threading.Thread(target=client) for _ in range(24)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if seen[429] and seen[504]:
                break
        assert set(seen) <= {200, 429, 504} and seen[429] and seen[504], seen
        assert set(kinds) == {"Overloaded", "Timeout"}
        assert retry_after == {"1"}
        assert httpx.get(process.url + "/health").status_code == 200
    finally:
        process.stop()


def test_sigterm_under_load_loses_no_accepted_request(built) -> None:
    process = ServerProcess(
        {"CHECKPOINT": str(built("wordpiece-cased")), "ENGINE": "onnxruntime", "SHUTDOWN_GRACE_S": "1", "WORKERS": "2"}
    )
    process.wait_ready()
    texts = corpus.texts()[:16]
    results: list = []  # list.append is atomic across threads; a Counter's += is not
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = post(process.url, {"inputs": texts, "aggregation_strategy": "first"}, timeout=30)
            except httpx.ConnectError:  # refused: never accepted, nothing lost
                results.append("refused")
                time.sleep(0.05)
                continue
            except httpx.HTTPError as error:  # accepted, then dropped: what must never happen
                results.append(f"lost:{type(error).__name__}")
                continue
            complete = response.status_code == 200 and len(response.json()) == len(texts)
            results.append("complete" if complete else response.status_code)
            # 503 while draining: a balancer stops routing here, and so does this client
            if response.status_code != 200:
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    graceful = process.stop()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert graceful, process.output()
    outcomes = Counter(results)
    assert outcomes["complete"] > 0 and set(outcomes) <= {"complete", 503, "refused"}, outcomes
    # Truss's supervisord kills the server 10 s after its SIGTERM: the drain ends well inside that.
    assert process.stop_seconds < Settings().shutdown_timeout_s + 0.5 < 10
    record(f"SIGTERM under load: {dict(outcomes)}; all processes gone {process.stop_seconds:.1f} s after the signal")
