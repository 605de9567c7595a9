"""What one connection may cost, over raw sockets against one real server process (one worker, its
limits set short so the test waits little): a half-sent head or a trickled body is answered 408 and
closed, a connection that sends nothing (before or between requests) is closed, a head past
max_header_bytes is answered 431 without being read further and without stalling the worker's other
connections, a client that stops reading its answer is cut off, and past max_connections idle
connections make room while busy ones leave a newcomer /health but not the model. Before
http/connections.py each of these connections stayed open for ever (issue 24)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import ServerProcess

KEEP_ALIVE_S, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, SEND_TIMEOUT_S = 0.5, 1.0, 1.5, 1.0
MAX_HEADER_BYTES, MAX_CONNECTIONS = 16 * 1024, 8


@pytest.fixture(scope="module")
def server(built):
    process = ServerProcess(
        {
            "CHECKPOINT": str(built("wordpiece-cased")),
            "ENGINE": "onnxruntime",
            "WORKERS": "1",
            "KEEP_ALIVE_S": str(KEEP_ALIVE_S),
            "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
            "MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
            "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        }
    )
    process.wait_ready()
    yield process
    assert process.stop(), process.output()


def connect(server, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def head(path: str = "/predict_tokens", length: int | None = None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: x", "content-type: application/json"]
    if length is not None:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def health_ms(server) -> float:
    started = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    return (time.monotonic() - started) * 1000


def test_a_half_sent_request_line_is_answered_408_and_closed(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /predict_tok")
        answer, seconds = read_until_closed(sock)
    status, body = status_and_body(answer)
    assert status == 408 and body["error_type"] == "Timeout", answer
    assert "did not arrive within 1 s" in body["error"]
    assert HEADER_TIMEOUT_S - 0.2 < seconds < HEADER_TIMEOUT_S + 2, seconds


def test_a_trickled_body_is_answered_408_when_its_time_is_up(server) -> None:
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.1):
                sock.sendall(b"a")

    with connect(server) as sock:
        sock.sendall(head(length=1000) + b'{"inputs": "')
        trickler = threading.Thread(target=trickle, args=(sock,))
        trickler.start()
        answer, seconds = read_until_closed(sock)
        stop.set()
        trickler.join()
    status, body = status_and_body(answer)
    assert status == 408 and "request body did not arrive within 1.5 s" in body["error"], answer
    assert BODY_TIMEOUT_S - 0.2 < seconds < BODY_TIMEOUT_S + 2, seconds


def test_idle_connections_are_closed_before_and_between_requests(server) -> None:
    with connect(server) as silent:
        answer, seconds = read_until_closed(silent)
    assert answer == b"" and seconds < KEEP_ALIVE_S + 1.5, seconds
    with connect(server) as kept:
        body = b'{"inputs": "Angela Merkel visited Paris."}'
        kept.sendall(head(length=len(body)) + body)
        answer, seconds = read_until_closed(kept)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert seconds < KEEP_ALIVE_S + 1.5, seconds  # the answer, then the close of the idle connection


def test_a_head_past_the_cap_is_refused_431_without_stalling_the_others(server) -> None:
    """32 MiB of one header in 64 KiB pieces: answered 431 once the cap is passed; the rest is never
    parsed (httptools' cost grows with a header's size, on the worker's one event loop)."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            latencies.append(health_ms(server))

    prober = threading.Thread(target=probe)
    with connect(server) as sock:
        prober.start()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        try:
            while sent < 32 << 20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # the server closed the connection, past the cap
            pass
        answer, _ = read_until_closed(sock)
    stop.set()
    prober.join()
    status, body = status_and_body(answer)
    assert status == 431 and f"exceed {MAX_HEADER_BYTES} bytes" in body["error"], answer[:300]
    assert sent < 8 << 20, sent  # refused long before the end: the server stopped reading
    assert latencies and max(latencies) < 1000, latencies
    ok = httpx.get(server.url + "/health", headers={"x-small": "a" * (MAX_HEADER_BYTES // 2)})
    assert ok.status_code == 200


def test_a_client_that_stops_reading_its_answer_is_cut_off(server) -> None:
    """An answer of megabytes asked for on a connection whose client never reads: the worker drops it
    after send_timeout_s instead of holding it (and its task) for ever, and serves on."""
    body = json.dumps({"inputs": ["the " * 1500] * 48, "raw_scores": True}).encode()  # an answer of 12 MB
    with connect(server, receive_buffer=4096) as sock:
        sock.sendall(head(length=len(body)) + body)
        time.sleep(SEND_TIMEOUT_S + 5)  # answered, stalled past the kernel's buffers, cut off
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += chunk
    answer_head, _, answer = received.partition(b"\r\n\r\n")
    assert answer_head.startswith(b"HTTP/1.1 200"), received[:300]
    length = int(answer_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 8 << 20 and len(answer) < length, (length, len(answer))  # what was unsent was dropped
    assert health_ms(server) < 1000


def test_past_max_connections_idle_ones_make_room_and_busy_ones_leave_health(server) -> None:
    idle = [connect(server) for _ in range(3 * MAX_CONNECTIONS)]
    assert health_ms(server) < 1000  # idle connections were closed to make room
    for sock in idle:
        sock.close()
    time.sleep(0.2)
    busy = [connect(server) for _ in range(MAX_CONNECTIONS)]
    for sock in busy:  # a head, and a body still to come: busy, not idle
        sock.sendall(head(length=100))
    time.sleep(0.2)
    assert health_ms(server) < 1000
    with connect(server) as newcomer:
        body = b'{"inputs": "Paris"}'
        newcomer.sendall(head(length=len(body)) + body)
        answer, _ = read_until_closed(newcomer)
    status, refusal = status_and_body(answer)
    assert status == 503 and refusal["error_type"] == "Overloaded", answer
    assert b"retry-after: 1" in answer.lower()
    for sock in busy:
        sock.close()
    time.sleep(0.2)
    assert httpx.post(server.url + "/predict_tokens", json={"inputs": "Paris"}).status_code == 200
