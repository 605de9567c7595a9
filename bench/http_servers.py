"""The HTTP server under the workers, chosen on measurement (issue 24, docs/http-server.md): what each
candidate ASGI server does with the connections that cost a worker without asking anything of it, and
what it costs per request when nothing goes wrong.

Every candidate runs ONE worker process (its own event loop, uvloop where the server can use one) with
the same small FastAPI app: POST /predict reads a JSON body and answers a small JSON, GET /health
answers {"status":"ok"}, so what is measured is the server, not the model. Candidates: uvicorn with
httptools and with h11, hypercorn, granian (its process manager with one worker process), and, when
it imports, the project's own uvicorn protocol (nerserve.http.connections.GuardedHttpToolsProtocol).
Each is set to the best limits it has (SETTINGS: what a careful operator would configure); the limits a
server does not have are listed beside it.

1. Limits, on 127.0.0.1 with raw sockets, each probe stopping by itself after --probe-s (16 s):
   - half a request line (`POST /x HT`), then nothing: closed after how long, with what answer;
   - a whole head with Content-Length: 1000, then the body trickled 1 byte a second;
   - a connection opened and nothing sent;
   - a keep-alive connection left idle after one complete request and answer;
   - 400 connections opened at once and left idle: how many are still open at the end, and whether
     GET /health on a new connection answers (status, time) while they are open and at the end;
   - a 32 MiB header sent in 64 KiB pieces (each server alone, the others idle): the answer, the bytes
     the client had sent and the server had read (sent minus what /proc/net/tcp shows still queued in
     the two sockets) when it came, the server's CPU time and resident memory meanwhile, and the longest
     a GET /health on another connection waited (a stalled event loop shows here).
   The four single-connection probes run on all servers at once (they are timers, not work), then the
   400 connections on all servers at once, then the header probe one server at a time.
2. Throughput: POST /predict with a CoNLL-sentence-sized body (~200 bytes) from bench/load.py's closed
   loop (raw keep-alive sockets, its own process), at 16 and 64 connections, servers interleaved
   (A B C D E, A B C D E, ...) --repeat times; the median requests/s of each, and its median ratio to
   uvicorn+httptools measured in the same round (this 2-core machine is shared; interleaving and the
   per-round ratio keep the drift of the neighbours out of the comparison), and the server's own CPU
   per request (its process tree's user+system time over the run), which the neighbours disturb less.
Writes bench/results/<date>-<cpu>-http-servers.{json,md}.

    PYTHONPATH=packages:bench .venv/bin/python bench/http_servers.py [--probe-s 16] [--seconds 2] [--repeat 8]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from load import ROOT, Server, closed_loop, free_port, request_bytes, start, tree_cpu_seconds

SENTENCE = (
    "Leicestershire took over at the top of the English county championship on Friday after an innings "
    "victory over Somerset at Taunton , Phil Simmons taking four for 38 ."
)
BODY = json.dumps({"inputs": [SENTENCE], "aggregation_strategy": "simple"}).encode()
HEALTH = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
TRICKLE_HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)
IDLE_CONNECTIONS = 400
BOUND = 256  # the connection (or request) bound set where a server has one: below the 400 idle connections
HEADER_BYTES = 32 << 20
PIECE = 64 << 10

#: each candidate's limits, as a careful operator would set them (the same deadlines everywhere the
#: server has the knob: 5 s idle, 10 s for the head, 10 s for the body, 64 KiB of head, 256 connections)
SETTINGS: dict[str, dict[str, Any]] = {
    "uvicorn-httptools": {
        "http": "httptools",
        "loop": "uvloop",
        "timeout_keep_alive": 5,
        "limit_concurrency": BOUND,
        "backlog": 2048,
    },
    "uvicorn-h11": {
        "http": "h11",
        "loop": "uvloop",
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 64 << 10,
        "limit_concurrency": BOUND,
        "backlog": 2048,
    },
    "hypercorn": {
        "worker_class": "uvloop",
        "keep_alive_timeout": 5,
        "read_timeout": 10,
        "h11_max_incomplete_size": 64 << 10,
        "backlog": 2048,
        # its default of 1000 closes a busy keep-alive connection every 1000 requests (the load
        # generator keeps its connections, as a load balancer's pool does)
        "keep_alive_max_requests": 1 << 30,
    },
    "granian": {
        "loop": "uvloop",
        "http": "1",
        "http1_header_read_timeout_ms": 10_000,
        "http1_max_buffer_size": 64 << 10,
        "backpressure": BOUND,
        "backlog": 2048,
    },
    "uvicorn-guarded": {
        "http": "nerserve.http.connections.guarded_protocol(ConnectionLimits(...))",
        "loop": "uvloop",
        "keep_alive_s": 5.0,
        "header_timeout_s": 10.0,
        "body_timeout_s": 10.0,
        "send_timeout_s": 30.0,
        "max_header_bytes": 64 << 10,
        "max_connections": BOUND,
        "backlog": 2048,
    },
}
#: what each server has no setting for (from its settings and sources; the probes show the effect)
MISSING: dict[str, list[str]] = {
    "uvicorn-httptools": [
        "head deadline",
        "body deadline or rate",
        "idle timeout before the first request",
        "header size cap",
        "connection bound that spares /health (limit_concurrency answers 503 to every request)",
    ],
    "uvicorn-h11": [
        "head deadline",
        "body deadline or rate",
        "idle timeout before the first request",
        "connection bound that spares /health (limit_concurrency answers 503 to every request)",
    ],
    "hypercorn": [
        "head or body deadline as a total or rate (read_timeout is per read: one byte resets it)",
        "connection bound (none per worker)",
    ],
    "granian": [
        "body deadline or rate",
        "idle keep-alive timeout apart from header_read_timeout",
        "connection bound that spares /health (past backpressure it stops accepting: /health waits)",
    ],
    "uvicorn-guarded": [],
}
ORDER = list(SETTINGS)
BASELINE = "uvicorn-httptools"


# --- the server side: one process per candidate (`--serve NAME --port P`)
def make_app() -> Any:
    """The same small app for every server: the cost of the server, not of a model."""
    import orjson

    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        texts = orjson.loads(await request.body())["inputs"]
        answer = [[{"entity_group": "ORG", "score": 0.99, "word": text[:14], "start": 0, "end": 14}] for text in texts]
        return Response(orjson.dumps(answer), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def serve(name: str, port: int) -> None:
    """Run candidate `name` on 127.0.0.1:`port` in this process, one worker, until terminated."""
    settings = dict(SETTINGS[name])
    app = make_app()
    backlog = settings.pop("backlog")
    if name.startswith("uvicorn"):
        import uvicorn

        http: Any = settings.pop("http")
        if name == "uvicorn-guarded":
            from nerserve.http.connections import ConnectionLimits, guarded_protocol

            limits = {k: settings.pop(k) for k in list(settings) if k in ConnectionLimits.__dataclass_fields__}
            http = guarded_protocol(ConnectionLimits(**limits))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            http=http,
            log_level="warning",
            access_log=False,
            backlog=backlog,
            **settings,
        )
        uvicorn.Server(config).run()
    elif name == "hypercorn":
        import signal

        import uvloop
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        hypercorn_config = Config()
        hypercorn_config.bind = [f"127.0.0.1:{port}"]
        hypercorn_config.backlog = backlog
        hypercorn_config.accesslog = None
        hypercorn_config.loglevel = "WARNING"
        for key, value in settings.items():
            if key != "worker_class":  # uvloop: the loop below
                setattr(hypercorn_config, key, value)

        async def main() -> None:
            import asyncio

            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await hypercorn_serve(app, hypercorn_config, shutdown_trigger=stop.wait)

        uvloop.run(main())
    elif name == "granian":
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.http import HTTP1Settings
        from granian.log import LogLevels
        from granian.server import Server as GranianServer

        # its process manager with one worker process, as it is deployed (its embedded server is experimental)
        GranianServer(
            "http_servers:granian_app",
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGI,
            workers=1,
            loop=Loops.uvloop,
            http=HTTPModes.http1,
            backlog=backlog,
            backpressure=settings["backpressure"],
            http1_settings=HTTP1Settings(
                header_read_timeout=settings["http1_header_read_timeout_ms"],
                max_buffer_size=settings["http1_max_buffer_size"],
            ),
            log_level=LogLevels.warning,
            working_dir=Path(__file__).parent,
        ).serve()
    else:
        raise SystemExit(f"unknown server {name}")


def __getattr__(attribute: str) -> Any:  # granian imports its target by name: the app, built on demand
    if attribute == "granian_app":
        return make_app()
    raise AttributeError(attribute)


def guarded_available() -> str | None:
    """None when the project's guarded protocol imports, else why not."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}
    probe = subprocess.run(
        [sys.executable, "-c", "from nerserve.http.connections import GuardedHttpToolsProtocol, guarded_protocol"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["failed"])[-1]


def launch(name: str) -> Server:
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "packages"), str(ROOT / "bench")])
    return start(
        [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--port", str(port)], env, timeout=120
    )


# --- the probes (raw sockets, each bounded in time)
def _status(data: bytes) -> int | None:
    if data.startswith(b"HTTP/"):
        with contextlib.suppress(IndexError, ValueError):
            return int(data.split(b" ", 2)[1])
    return None


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ready(read: list[socket.socket], write: list[socket.socket], timeout: float) -> tuple[list, list]:
    """select() for any number of descriptors (epoll: a probe's sockets are past select's 1024)."""
    with selectors.DefaultSelector() as selector:
        for sock in read:
            selector.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if sock in write else 0))
        for sock in write:
            if sock not in read:
                selector.register(sock, selectors.EVENT_WRITE)
        events = selector.select(max(timeout, 0))
    return (
        [key.fileobj for key, mask in events if mask & selectors.EVENT_READ],
        [key.fileobj for key, mask in events if mask & selectors.EVENT_WRITE],
    )


def _closed(sock: socket.socket) -> tuple[bool, bytes]:
    """(closed, bytes that came) for a readable socket, without blocking."""
    try:
        data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False, b""
    except (ConnectionResetError, BrokenPipeError):
        return True, b""
    return not data, data


def _watch(sock: socket.socket, started: float, deadline: float, tick: Callable[[], None] | None = None) -> dict:
    """Wait until the server closes `sock` or `deadline`; what it answered and when. `tick` runs every
    second (the trickle's next byte)."""
    answer = b""
    next_tick = time.monotonic() + 1
    result: dict = {"closed_after_s": None, "status": None, "answered_after_s": None}
    while (now := time.monotonic()) < deadline:
        timeout = min(deadline, next_tick if tick else deadline) - now
        readable, _ = _ready([sock], [], timeout)
        if readable:
            closed, data = _closed(sock)
            if data and not answer:
                result["answered_after_s"] = round(time.monotonic() - started, 2)
            answer += data
            if closed:
                result["closed_after_s"] = round(time.monotonic() - started, 2)
                break
        if tick and time.monotonic() >= next_tick:
            next_tick += 1
            try:
                tick()
            except OSError:
                result["closed_after_s"] = round(time.monotonic() - started, 2)
                result["closed_by"] = "reset (found sending)"
                break
    result["status"] = _status(answer)
    return result


def probe_half_line(port: int, limit: float) -> dict:
    sock = _connect(port)
    started = time.monotonic()
    sock.sendall(b"POST /x HT")
    with sock:
        return _watch(sock, started, started + limit)


def probe_silent(port: int, limit: float) -> dict:
    sock = _connect(port)
    started = time.monotonic()
    with sock:
        return _watch(sock, started, started + limit)


def probe_trickle(port: int, limit: float) -> dict:
    sock = _connect(port)
    sock.sendall(TRICKLE_HEAD)
    started = time.monotonic()
    sent = [0]

    def one_byte() -> None:
        sock.send(b" ")
        sent[0] += 1

    with sock:
        result = _watch(sock, started, started + limit, tick=one_byte)
    result["body_bytes_sent"] = sent[0]
    return result


def _request(sock: socket.socket, payload: bytes, timeout: float = 30) -> tuple[int | None, float]:
    """Send one request on a keep-alive connection and read its answer whole: (status, seconds)."""
    started = time.perf_counter()
    sock.settimeout(timeout)
    sock.sendall(payload)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return _status(data), time.perf_counter() - started
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(rest) < length:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        rest += chunk
    return _status(data), time.perf_counter() - started


def health_on_new_connection(port: int) -> dict:
    """GET /health on a new connection: status and milliseconds (connect included), or what failed."""
    started = time.perf_counter()
    try:
        with _connect(port) as sock:
            status, _ = _request(sock, HEALTH, timeout=10)
    except OSError as error:
        return {"status": None, "error": type(error).__name__, "ms": round((time.perf_counter() - started) * 1e3, 1)}
    return {"status": status, "ms": round((time.perf_counter() - started) * 1e3, 1)}


def probe_keep_alive(port: int, limit: float) -> dict:
    sock = _connect(port)
    with sock:
        status, _ = _request(sock, HEALTH)
        started = time.monotonic()
        result = _watch(sock, started, started + limit)
    result["first_status"] = status
    return result


def probe_idle_many(port: int, limit: float) -> dict:
    """IDLE_CONNECTIONS connections opened at once, nothing sent; /health beside them."""
    socks = []
    started = time.monotonic()
    for _ in range(IDLE_CONNECTIONS):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    result: dict = {"opened": len(socks), "open_s": round(time.monotonic() - started, 2)}
    time.sleep(2)
    result["health_while_open"] = health_on_new_connection(port)
    open_now = list(socks)
    answers: dict[str, int] = {}
    while (remaining := started + limit - time.monotonic()) > 0 and open_now:
        readable, _ = _ready(open_now, [], remaining)
        for sock in readable:
            closed, data = _closed(sock)
            status = _status(data)
            if status:
                answers[str(status)] = answers.get(str(status), 0) + 1
            if closed:
                open_now.remove(sock)
    result["still_open_at_end"] = len(open_now)
    result["answers"] = answers
    result["health_at_end"] = health_on_new_connection(port)
    for sock in socks:
        sock.close()
    return result


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (granian's worker is a child of its manager)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return round(total / 1024, 1)


def _queued(local: int, remote: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) of the IPv4 TCP socket local->remote on 127.0.0.1, from /proc/net/tcp."""
    want = (f"0100007F:{local:04X}", f"0100007F:{remote:04X}")
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def probe_big_header(port: int, limit: float, pid: int) -> dict:
    """A HEADER_BYTES header in PIECE pieces while /health is asked every 50 ms on another connection;
    the server's resident memory (process `pid` and its children) before and at the answer."""
    rss_before, cpu_before = tree_rss_mib(pid), tree_cpu_seconds(pid)
    stop = threading.Event()
    waits: list[tuple[float, float]] = []  # (when asked, seconds waited)

    def ask_health() -> None:
        with _connect(port) as sock:
            while not stop.is_set():
                asked = time.monotonic()
                try:
                    _, seconds = _request(sock, HEALTH, timeout=limit + 5)
                except OSError:
                    return
                waits.append((asked, seconds))
                time.sleep(0.05)

    asker = threading.Thread(target=ask_health, daemon=True)
    asker.start()
    time.sleep(0.3)
    sock = _connect(port)
    client_port = sock.getsockname()[1]
    sock.setblocking(False)
    payload = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Big: "
    total = len(payload) + HEADER_BYTES
    piece = b"a" * PIECE
    pending = memoryview(payload)
    sent, read_by_server = 0, 0
    answer = b""
    result: dict = {"status": None, "closed": False}
    started = time.monotonic()
    deadline = started + limit
    sampled = 0.0
    while time.monotonic() < deadline:
        readable, writable = _ready([sock], [sock] if sent < total else [], 0.5)
        if readable or time.monotonic() - sampled > 0.05:  # not every send: the flood as fast as it goes
            sampled = time.monotonic()
            queues = [_queued(client_port, port), _queued(port, client_port)]
            if queues[0] is not None and queues[1] is not None:
                read_by_server = max(read_by_server, sent - queues[0][0] - queues[1][1])
        if readable:
            closed, data = _closed(sock)
            answer += data
            if closed or data:
                result["closed"] = closed
                break
        if writable:
            if not pending:
                pending = memoryview(piece[: min(PIECE, total - sent)])
            try:
                n = sock.send(pending)
            except BlockingIOError:
                continue
            except OSError:
                result["closed"] = True
                break
            sent += n
            pending = pending[n:]
            if sent >= total:
                result["all_sent_after_s"] = round(time.monotonic() - started, 2)
    seconds = time.monotonic() - started
    rss_at_end, cpu = tree_rss_mib(pid), tree_cpu_seconds(pid) - cpu_before
    with contextlib.suppress(OSError):  # the rest of the answer, if any
        sock.setblocking(True)
        sock.settimeout(1)
        while chunk := sock.recv(1 << 16):
            answer += chunk
        result["closed"] = True
    sock.close()
    stop.set()
    asker.join(limit + 10)
    result.update(
        status=_status(answer),
        client_sent_bytes=sent,
        server_read_bytes=read_by_server,
        all_sent=sent >= total,
        seconds=round(seconds, 2),
        timed_out=seconds >= limit,
        rss_before_mib=rss_before,
        rss_at_end_mib=rss_at_end,
        server_cpu_s=round(cpu, 2),
        health_requests=len(waits),
        health_max_wait_ms=round(max(w for _, w in waits) * 1e3, 1) if waits else None,
        health_max_wait_asked_at_s=round(max(waits, key=lambda aw: aw[1])[0] - started, 2) if waits else None,
        health_median_ms=round(statistics.median(w for _, w in waits) * 1e3, 2) if waits else None,
    )
    return result


TIMED_PROBES: dict[str, Callable[[int, float], dict]] = {
    "half_line": probe_half_line,
    "trickle_body": probe_trickle,
    "silent": probe_silent,
    "idle_keep_alive": probe_keep_alive,
}


def run_timed_probes(
    servers: dict[str, Server], limit: float, probes: dict[str, Callable[[int, float], dict]], into: dict[str, dict]
) -> None:
    """`probes` on every server at once (one thread each: they wait, they do not work)."""

    def run(name: str, probe: str) -> None:
        try:
            into[name][probe] = probes[probe](servers[name].port, limit)
        except Exception as error:  # a probe that cannot even connect is a finding, not a crash
            into[name][probe] = {"error": f"{type(error).__name__}: {error}"}

    threads = [threading.Thread(target=run, args=(n, p)) for n in servers for p in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- throughput
def throughput(servers: dict[str, Server], connections: list[int], seconds: float, repeat: int) -> dict:
    """Requests/s of each server, interleaved, `repeat` rounds; medians and per-round ratios to BASELINE."""
    requests = [(request_bytes("/predict", BODY), 1)]
    rounds: dict[str, dict[str, list[dict]]] = {str(c): {name: [] for name in servers} for c in connections}
    for r in range(repeat):
        for c in connections:
            for name, server in servers.items():
                cpu = tree_cpu_seconds(server.process.pid)
                measured = closed_loop(server.port, requests, c, seconds)
                answered = measured["requests_s"] * seconds  # about: closed_loop reports the rate
                measured["server_cpu_us"] = (tree_cpu_seconds(server.process.pid) - cpu) / max(answered, 1) * 1e6
                measured["server_cores"] = measured["server_cpu_us"] * measured["requests_s"] / 1e6
                rounds[str(c)][name].append(measured)
                print(
                    f"round {r + 1}, {c} connections, {name}: {measured['requests_s']:,.0f} req/s "
                    f"p50 {measured['p50_ms']:.2f} ms, server {measured['server_cpu_us']:.0f} CPU-us/request, "
                    f"client {measured['client_cores']:.2f} cores",
                    flush=True,
                )
    out: dict = {}
    for key, by_name in rounds.items():
        out[key] = {}
        for name, runs in by_name.items():
            pairs = zip(runs, by_name[BASELINE], strict=True)
            ratios, cpu_ratios = [], []
            for run, base in pairs:
                ratios.append(run["requests_s"] / max(base["requests_s"], 1e-9))
                cpu_ratios.append(base["server_cpu_us"] / max(run["server_cpu_us"], 1e-9))
            out[key][name] = {
                "requests_s": statistics.median(run["requests_s"] for run in runs),
                "p50_ms": statistics.median(run["p50_ms"] for run in runs),
                "p99_ms": statistics.median(run["p99_ms"] for run in runs),
                "client_cores": statistics.median(run["client_cores"] for run in runs),
                "ratio": statistics.median(ratios),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "server_cpu_us": statistics.median(run["server_cpu_us"] for run in runs),
                "cpu_ratio": statistics.median(cpu_ratios),
                "server_cores": statistics.median(run["server_cores"] for run in runs),
                "rounds_requests_s": [round(run["requests_s"], 1) for run in runs],
                "statuses": [run["statuses"] for run in runs],
            }
    return out


# --- the report
def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    versions = {p: version(p) for p in ("uvicorn", "httptools", "h11", "hypercorn", "granian", "fastapi", "uvloop")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        **versions,
    }


def _closed_cell(probe: dict) -> str:
    if "error" in probe:
        return f"error: {probe['error']}"
    if probe["closed_after_s"] is None:
        return "open at the end"
    status = f"{probe['status']}, " if probe.get("status") else "no answer, "
    return f"{status}closed at {probe['closed_after_s']:g} s"


def table(results: dict) -> str:
    m = results["machine"]
    limit = results["probe_s"]
    names = list(results["limits"])
    lines = [
        f"machine: {m['cpu']} x{m['cores']} (shared, load average at start {m['load_average'][0]:.1f}) | "
        f"{results['date']} | Python {m['python']}, uvicorn {m['uvicorn']}, httptools {m['httptools']}, "
        f"h11 {m['h11']}, hypercorn {m['hypercorn']}, granian {m['granian']}, uvloop {m['uvloop']}",
        "",
        f"Limits (each probe stops after {limit:g} s; one worker each):",
        "",
        "| probe | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    probes = [
        ("half a request line, then nothing", "half_line"),
        ("head, then the body at 1 byte/s", "trickle_body"),
        ("connection opened, nothing sent", "silent"),
        ("idle keep-alive after one request", "idle_keep_alive"),
    ]
    for label, key in probes:
        lines.append(f"| {label} | " + " | ".join(_closed_cell(results["limits"][n][key]) for n in names) + " |")

    def header(r: dict) -> str:
        if "error" in r:
            return f"error: {r['error']}"
        if r["status"] or r["closed"]:
            outcome = f"{r['status'] or 'closed, no answer'} after {r['seconds']:g} s"
        elif r["all_sent"]:
            outcome = f"all sent in {r['all_sent_after_s']:g} s, no answer by {r['seconds']:g} s"
        else:
            outcome = f"no answer by {r['seconds']:g} s"
        return (
            f"{outcome}: {r['client_sent_bytes'] / 1024:,.0f} KiB sent, >= {r['server_read_bytes'] / 1024:,.0f} "
            f"KiB read; server CPU {r['server_cpu_s']:g} s, RSS {r['rss_before_mib']:g} -> "
            f"{r['rss_at_end_mib']:g} MiB; /health waited up to {r['health_max_wait_ms']} ms"
        )

    def idle(r: dict) -> str:
        if "error" in r:
            return f"error: {r['error']}"
        during, end = r["health_while_open"], r["health_at_end"]
        return (
            f"{r['still_open_at_end']}/{r['opened']} open at the end; /health: {during['status']} in {during['ms']} ms "
            f"while open, {end['status']} in {end['ms']} ms at the end"
        )

    lines.append("| 32 MiB header in 64 KiB pieces | " + " | ".join(header(results["header"][n]) for n in names) + " |")
    lines.append(
        f"| {IDLE_CONNECTIONS} idle connections | "
        + " | ".join(idle(results["limits"][n]["idle_400"]) for n in names)
        + " |"
    )
    lines += ["", "Settings:", ""]
    for name in names:
        missing = "; ".join(results["missing"][name]) or "none of those asked for"
        lines.append(f"- {name}: `{json.dumps(results['settings'][name])}`; no setting for: {missing}")
    for name, why in results["skipped"].items():
        lines.append(f"- {name}: not run ({why})")
    lines += [
        "",
        f"Throughput: POST /predict, {len(BODY)}-byte body, closed loop, {results['seconds']:g} s a run, "
        f"median of {results['repeat']} interleaved rounds. rate ratio: the median of the per-round ratios of "
        f"requests/s to {BASELINE} (range in brackets); CPU ratio: {BASELINE}'s server CPU per request over "
        "this server's, per round, median (above 1: cheaper per request):",
        "",
        "| server | connections | requests/s | rate ratio | p50 ms | server cores | server CPU µs/req | CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        for c in results["throughput"]:
            t = results["throughput"][c][name]
            low, high = t["ratio_range"]
            lines.append(
                f"| {name} | {c} | {t['requests_s']:,.0f} | {t['ratio']:.2f}x [{low:.2f}-{high:.2f}] | "
                f"{t['p50_ms']:.2f} | {t['server_cores']:.2f} | {t['server_cpu_us']:.0f} | {t['cpu_ratio']:.2f}x |"
            )
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit, and whether the protocol measured differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "packages/nerserve/http/connections.py"]).returncode
    return head + (" (http/connections.py modified)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe-s", type=float, default=16.0, help="each limit probe stops after this")
    parser.add_argument("--seconds", type=float, default=2.0, help="each throughput run")
    parser.add_argument("--repeat", type=int, default=8, help="interleaved throughput rounds")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--servers", nargs="+", default=ORDER, choices=ORDER)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", choices=ORDER, help=argparse.SUPPRESS)  # a candidate's own process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    started = time.monotonic()
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["PYTHONPATH=packages:bench .venv/bin/python bench/http_servers.py", *sys.argv[1:]]),
        "commit": _commit(),
        "probe_s": args.probe_s,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "settings": SETTINGS,
        "missing": MISSING,
        "skipped": {},
    }
    names = list(args.servers)
    if "uvicorn-guarded" in names and (why := guarded_available()):
        results["skipped"]["uvicorn-guarded"] = f"nerserve.http.connections does not import: {why}"
        names.remove("uvicorn-guarded")
    servers: dict[str, Server] = {}
    try:
        for name in names:
            try:
                servers[name] = launch(name)
            except RuntimeError as error:
                results["skipped"][name] = f"did not start: {str(error)[-600:]}"
                print(f"{name}: did not start: {error}", flush=True)
        print(f"servers up: {', '.join(servers)}", flush=True)
        # the single connections first, then the 400 (which push a bounded server to close idle ones)
        results["limits"] = {name: {} for name in servers}
        run_timed_probes(servers, args.probe_s, TIMED_PROBES, results["limits"])
        run_timed_probes(servers, args.probe_s, {"idle_400": probe_idle_many}, results["limits"])
        print(json.dumps(results["limits"], indent=1), flush=True)
        results["header"] = {}
        for name, server in servers.items():
            try:
                results["header"][name] = probe_big_header(server.port, args.probe_s, server.process.pid)
            except Exception as error:
                results["header"][name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"header {name}: {results['header'][name]}", flush=True)
            if server.process.poll() is not None:  # the flood killed it: a fresh one for the throughput
                results["header"][name]["server_exited"] = server.process.returncode
                servers[name] = launch(name)
        results["throughput"] = throughput(servers, args.connections, args.seconds, args.repeat)
    finally:
        for server in servers.values():
            server.stop()
    results["wall_s"] = round(time.monotonic() - started, 1)
    cpu = results["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{cpu}-http-servers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    out.with_suffix(".md").write_text(f"# HTTP servers (bench/http_servers.py)\n\n`{results['command']}`\n\n{text}\n")
    print("\n" + text, f"\nwrote {out} in {results['wall_s']} s", sep="\n")


if __name__ == "__main__":
    main()
