"""What the HTTP benches share: starting a server process, the requests (CoNLL sentences and paragraphs),
a lean load generator, and CPU accounting.

The load generator is a closed loop over raw keep-alive sockets (prepared request bytes, a response read
by its Content-Length), one selector in its own process, so it costs a few tens of microseconds per
request: on a 2-core machine a heavier client (httpx, aiohttp) would take the cores it is measuring."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import selectors
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server process on a port, and its log."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(command: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 900) -> Server:
    """Start `command` (a server listening on env's port setting) and wait until /health answers 200."""
    port = int(env.get("NERSERVE_PORT") or env.get("PORT") or 0)
    log = Path(tempfile.mkstemp(prefix="nerbench-server-", suffix=".log")[1])
    with open(log, "w") as out:  # the server keeps its own copy of the descriptor
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=out)
    server = Server(process, port, log)
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        if time.time() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy in {timeout} s")
        time.sleep(0.3)


def server_env(**settings: str) -> dict[str, str]:
    """The environment for `python -m nerserve serve` with these settings (NERSERVE_<NAME>), on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERSERVE_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "packages"), str(ROOT / "bench")]),
        NERSERVE_CONFIG=str(ROOT / "config.yaml"),
        NERSERVE_PORT=str(free_port()),
        NERSERVE_LOG_LEVEL="WARNING",
    )
    env.update({f"NERSERVE_{name.upper()}": value for name, value in settings.items()})
    return env


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants so far."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, ValueError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total


def paragraphs(texts: list[str], counts: np.ndarray, low: int = 200, high: int = 400) -> list[str]:
    """Consecutive sentences joined until 200-400 model tokens."""
    out, cur, n = [], [], 0
    for text, c in zip(texts, counts, strict=True):
        if n + c > high and n >= low:
            out.append(" ".join(cur))
            cur, n = [], 0
        if c > high:
            continue
        cur.append(text)
        n += int(c) - (2 if cur[:-1] else 0)
    return out


def requests_of(items: list, per: int) -> list[list]:
    """Consecutive requests of `per` items, as the HTTP bench sends them (one shorter request when
    there are fewer than `per` items, so a small --sentences still measures something)."""
    return [items[i : i + per] for i in range(0, len(items) - per + 1, per)] or [items]


def request_bytes(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def predict_requests(chunks: list[list[str]], weight: Callable[[str], int]) -> list[tuple[bytes, int]]:
    """One POST /predict_tokens per chunk of texts (strategy `simple`, as every bench row asks), each with
    what `closed_loop` counts when it is answered: the sum of its texts' weights (their tokens, or 1 to
    count texts)."""
    return [
        (
            request_bytes("/predict_tokens", orjson.dumps({"inputs": chunk, "aggregation_strategy": "simple"})),
            sum(weight(text) for text in chunk),
        )
        for chunk in chunks
    ]


def engine_batch_seconds(url: str) -> tuple[float, float]:
    """(seconds, batches) the server's engine has run so far, from its /metrics."""
    text = httpx.get(url + "/metrics").text
    found = [re.search(rf'nerserve_stage_seconds_{f}{{stage="engine"}} ([0-9.e+]+)', text) for f in ("sum", "count")]
    return (float(found[0].group(1)) if found[0] else 0.0, float(found[1].group(1)) if found[1] else 0.0)


def _closed_loop(port: int, requests: list[tuple[bytes, int]], connections: int, seconds: float, queue) -> None:
    """Each connection sends its next request as soon as the last one is answered, until the deadline."""
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    tokens = answered = 0
    cpu_started = time.process_time()  # the loop's own CPU, not the process's start-up
    started = time.perf_counter()
    deadline = started + seconds
    cursor = 0

    def send(sock: socket.socket, state: dict) -> None:
        nonlocal cursor
        payload, count = requests[cursor % len(requests)]
        cursor += 1
        state.update(buffer=bytearray(), size=None, tokens=count, sent=time.perf_counter())
        sock.sendall(payload)

    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state: dict = {}
        selector.register(sock, selectors.EVENT_READ, state)
        send(sock, state)
    open_connections = connections
    while open_connections:
        for key, _ in selector.select(timeout=120):
            sock, state = key.fileobj, key.data
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed a connection")
            buffer = state["buffer"]
            buffer += chunk
            if state.get("size") is None:  # the head, once
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(buffer[:end]).lower()
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in head else 0
                state.update(size=end + 4 + length, status=int(head.split(b" ", 2)[1]))
            if len(buffer) < state["size"]:
                continue
            status = state.pop("status")
            state["size"] = None
            now = time.perf_counter()
            latencies.append(now - state["sent"])
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                tokens += state["tokens"]
                answered += 1
            if now < deadline:
                send(sock, state)
            else:
                selector.unregister(sock)
                sock.close()
                open_connections -= 1
    elapsed = time.perf_counter() - started
    queue.put(
        {
            "tokens": tokens,
            "answered": answered,
            "elapsed": elapsed,
            "latencies": latencies,
            "statuses": statuses,
            "client_cpu_s": time.process_time() - cpu_started,
        }
    )


def closed_loop(port: int, requests: list[tuple[bytes, int]], connections: int, seconds: float) -> dict:
    """Run the load generator in its own process; tokens/s, requests/s, latency percentiles, statuses."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_closed_loop, args=(port, requests, connections, seconds, queue))
    process.start()
    result = queue.get(timeout=seconds + 300)
    process.join()
    latencies = np.array(result["latencies"]) * 1e3
    return {
        "tokens_s": result["tokens"] / result["elapsed"],
        "requests_s": result["answered"] / result["elapsed"],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "statuses": result["statuses"],
        "client_cores": result["client_cpu_s"] / result["elapsed"],
        "connections": connections,
    }
