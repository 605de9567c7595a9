"""A soak of the server under mixed, partly hostile load (issue 24; `make soak`, not part of `make test`).

One `nerserve serve` of the shared checkpoint (two workers, a small engine queue) gets, at once, for
`--seconds` (ten minutes by default), only from this machine's loopback:
- sentence clients: 1-8 CoNLL dev sentences a request, one request at a time each;
- a document client: 8 paragraphs (200-400 tokens) a request;
- a queue filler: 64-sentence requests on several connections, so the engine's queue stays full and
  others meet 429s;
- bad bodies: not JSON, wrong types, too many texts, over the token limit (each must be a 4xx);
- slow and hostile connections: half a request line, a trickled body, idle connections, a 1 MiB header;
- a worker killed (SIGKILL) every `--kill-every` seconds;
- a /health probe on a new connection every 0.25 s.

Every 200 answer is checked against the same request sent alone before the load (same tokens, spans and
labels; scores within 1e-4, as batches of other shapes may round differently). A request answered 429 or
503 is sent again after its Retry-After (the client's part: nothing was started). A connection reset
without a status is a lost request, except on a worker that was just killed (within 2 s of a kill: its
connections die with it; the request is then sent again and counted apart). Resident memory of each
process is read at the start and the end. Writes bench/results/<date>-<machine>-soak.{json,md}.

    PYTHONPATH=packages .venv/bin/python bench/soak.py [--seconds 600] [--kill-every 60]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from load import ROOT, paragraphs, requests_of, server_env, start
from run import DEFAULT_CONLL, DEFAULT_MODEL, conll_sentences, machine_name

RESULTS = ROOT / "bench" / "results"
KILL_WINDOW_S = 2.0
SCORE_TOLERANCE = 1e-4


class Tally:
    """Counters shared by the load threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.sentence_ms: list[float] = []
        self.health_ms: list[float] = []
        self.kills: list[float] = []
        self.wrong: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def just_killed(self) -> bool:
        now = time.monotonic()
        return any(now - kill < KILL_WINDOW_S for kill in self.kills)


def same_answer(got: list, want: list) -> bool:
    """Same items (token, ids, spans, labels) with scores within SCORE_TOLERANCE."""
    if len(got) != len(want):
        return False
    for text_got, text_want in zip(got, want, strict=True):
        if len(text_got) != len(text_want):
            return False
        for a, b in zip(text_got, text_want, strict=True):
            if (a["token"], a["token_id"], a["start"], a["end"]) != (b["token"], b["token_id"], b["start"], b["end"]):
                return False
            if a["results"].keys() != b["results"].keys():
                return False
            if any(abs(a["results"][k] - b["results"][k]) > SCORE_TOLERANCE for k in a["results"]):
                return False
    return True


def checked_client(url: str, bodies: list[dict], answers: list[list], tally: Tally, stop: threading.Event, kind: str):
    """One request at a time from `bodies`, each answer compared with its answer alone."""
    rng = random.Random(kind)
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            index = rng.randrange(len(bodies))
            started = time.monotonic()
            while not stop.is_set():
                try:
                    response = client.post("/predict_tokens", json=bodies[index])
                except httpx.TransportError:
                    tally.add(f"{kind}_reset_after_kill" if tally.just_killed() else f"{kind}_lost")
                    time.sleep(0.1)
                    continue  # sent again
                if response.status_code in (429, 503):
                    tally.add(f"{kind}_{response.status_code}")
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                break
            else:
                return
            tally.add(f"{kind}_{response.status_code}")
            if response.status_code != 200:
                tally.wrong.append(f"{kind}: {response.status_code} {response.text[:200]}")
                continue
            if not same_answer(response.json(), answers[index]):
                tally.wrong.append(f"{kind}: request {index} answered differently")
            if kind == "sentence":
                with tally.lock:
                    tally.sentence_ms.append((time.monotonic() - started) * 1000)


def queue_filler(url: str, body: dict, tally: Tally, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            try:
                tally.add(f"filler_{client.post('/predict_tokens', json=body).status_code}")
            except httpx.TransportError:
                tally.add("filler_reset_after_kill" if tally.just_killed() else "filler_lost")
                time.sleep(0.1)


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"{not json", "application/json"),
    (b'{"inputs": 5}', "application/json"),
    (b'{"inputs": ["a"], "aggregation_strategy": "best"}', "application/json"),
    (json.dumps({"inputs": ["x"] * 5000}).encode(), "application/json"),
    (json.dumps({"inputs": "!" * 1_500_000}).encode(), "application/json"),
    (b"\xff\xfe\x00", "application/json"),
    (b'{"inputs": "a"}', "text/plain"),
]


def bad_bodies(url: str, tally: Tally, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.wait(1.0):
            for body, content_type in BAD_BODIES:
                try:
                    status = client.post("/predict_tokens", content=body, headers={"content-type": content_type})
                except httpx.TransportError:
                    tally.add("bad_reset_after_kill" if tally.just_killed() else "bad_lost")
                    continue
                tally.add("bad_4xx" if 400 <= status.status_code < 500 else f"bad_{status.status_code}")
                if status.status_code >= 500 and status.status_code != 503:
                    tally.wrong.append(f"bad body answered {status.status_code}: {status.text[:200]}")


def hostile_connections(port: int, tally: Tally, stop: threading.Event) -> None:
    """Half heads, trickled bodies, idle connections and a 1 MiB header, a few at a time; each must end."""
    heads = [
        b"POST /predict_tok",
        b"POST /predict_tokens HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
        b"",
    ]
    while not stop.wait(1.0):
        sockets = []
        for head in heads:
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.sendall(head)
                sockets.append(sock)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=60) as big:
            big.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
            with contextlib.suppress(OSError):
                for _ in range(16):
                    big.sendall(b"a" * 65536)
            answer = big.recv(4096)
            tally.add("header_431" if answer.startswith(b"HTTP/1.1 431") else "header_other")
        for sock in sockets:  # every one is closed by the server within its deadlines
            started = time.monotonic()
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            tally.add("hostile_closed" if time.monotonic() - started < 40 else "hostile_open")
            sock.close()


def health_probe(url: str, tally: Tally, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        started = time.monotonic()
        try:
            status = httpx.get(url + "/health", timeout=30).status_code
        except httpx.TransportError:
            status = 0
        with tally.lock:
            tally.health_ms.append((time.monotonic() - started) * 1000)
        tally.add(f"health_{status}")


def engine_of(supervisor: int) -> int:
    """The engine process: the supervisor's first spawned child (server.py starts it before the workers;
    multiprocessing's resource tracker is a child too)."""
    spawned = [pid for pid in children(supervisor) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return spawned[0]


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)


def workers_of(supervisor: int, engine: int) -> list[int]:
    return [
        pid
        for pid in children(supervisor)
        if pid != engine and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    return 0.0


def memory(supervisor: int, engine: int) -> dict[str, float]:
    """Resident MiB of each process by role (workers by pid)."""
    out = {"supervisor": rss_mib(supervisor), "engine": rss_mib(engine)}
    for pid in workers_of(supervisor, engine):
        out[f"worker {pid}"] = rss_mib(pid)
    return out


def killer(supervisor: int, engine: int, every: float, tally: Tally, stop: threading.Event) -> None:
    while not stop.wait(every):
        workers = workers_of(supervisor, engine)
        if workers:
            with tally.lock:
                tally.kills.append(time.monotonic())
            os.kill(random.choice(workers), signal.SIGKILL)
            tally.add("workers_killed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--kill-every", type=float, default=60)
    parser.add_argument("--checkpoint", default=str(DEFAULT_MODEL))
    parser.add_argument("--conll", default=str(DEFAULT_CONLL))
    args = parser.parse_args()

    sentences = conll_sentences(Path(args.conll))[0]
    rng = random.Random(0)
    sentence_bodies = [
        {"inputs": rng.sample(sentences, rng.randint(1, 8)), "aggregation_strategy": rng.choice(["simple", "none"])}
        for _ in range(200)
    ]
    counts = np.array([len(s.split()) * 2 for s in sentences])  # a rough token count is enough to group them
    document_bodies = [
        {"inputs": chunk, "aggregation_strategy": "max"} for chunk in requests_of(paragraphs(sentences, counts), 8)
    ][:40]
    filler_body = {"inputs": sentences[:64], "aggregation_strategy": "simple"}

    env = server_env(CHECKPOINT=args.checkpoint, ENGINE="onnxruntime", WORKERS="2", QUEUE_SIZE="128")
    server = start([str(ROOT / ".venv" / "bin" / "python"), "-m", "nerserve", "serve"], env)
    supervisor = server.process.pid
    try:
        engine = engine_of(supervisor)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            sentence_answers = [client.post("/predict_tokens", json=b).json() for b in sentence_bodies]
            document_answers = [client.post("/predict_tokens", json=b).json() for b in document_bodies]
        memory_start = memory(supervisor, engine)
        tally, stop = Tally(), threading.Event()
        threads = [
            *(
                threading.Thread(
                    target=checked_client, args=(server.url, sentence_bodies, sentence_answers, tally, stop, "sentence")
                )
                for _ in range(2)
            ),
            threading.Thread(
                target=checked_client, args=(server.url, document_bodies, document_answers, tally, stop, "document")
            ),
            *(threading.Thread(target=queue_filler, args=(server.url, filler_body, tally, stop)) for _ in range(3)),
            threading.Thread(target=bad_bodies, args=(server.url, tally, stop)),
            threading.Thread(target=hostile_connections, args=(server.port, tally, stop)),
            threading.Thread(target=health_probe, args=(server.url, tally, stop)),
            threading.Thread(target=killer, args=(supervisor, engine, args.kill_every, tally, stop)),
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while time.monotonic() - started < args.seconds:
            time.sleep(5)
            print(f"{time.monotonic() - started:5.0f} s  {dict(sorted(tally.counts.items()))}", flush=True)
        stop.set()
        for thread in threads:
            thread.join(180)
        time.sleep(3)
        memory_end = memory(supervisor, engine)
        health_after = httpx.get(server.url + "/health", timeout=10).status_code
    finally:
        server.stop()

    sentence_ms = np.array(tally.sentence_ms)
    lost = sum(n for key, n in tally.counts.items() if key.endswith("_lost"))
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine_name(),
        "seconds": args.seconds,
        "kill_every_s": args.kill_every,
        "checkpoint": Path(args.checkpoint).name,
        "counts": dict(sorted(tally.counts.items())),
        "wrong_answers": len(tally.wrong),
        "wrong_examples": tally.wrong[:10],
        "requests_lost": lost,
        "sentence_p50_ms": float(np.percentile(sentence_ms, 50)) if len(sentence_ms) else None,
        "sentence_p99_ms": float(np.percentile(sentence_ms, 99)) if len(sentence_ms) else None,
        "health_worst_ms": max(tally.health_ms, default=None),
        "health_after": health_after,
        "memory_start_mib": memory_start,
        "memory_end_mib": memory_end,
    }
    RESULTS.mkdir(exist_ok=True)
    cpu = result["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    stem = RESULTS / f"{result['date']}-{cpu}-soak"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    m, c = result["machine"], result["counts"]
    lines = [
        f"# Soak: {result['seconds']:.0f} s of mixed load, a worker killed every {result['kill_every_s']:.0f} s",
        "",
        f"machine: CPU {m['cpu']} x{m['cores']}, no GPU | {result['date']} | {result['checkpoint']}, ONNX Runtime, "
        "2 workers, queue_size 128 | `PYTHONPATH=packages .venv/bin/python bench/soak.py`",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| wrong answers (each checked against the same request sent alone) | {result['wrong_answers']} |",
        f"| requests lost (no answer, or a reset without a status, away from a kill) | {result['requests_lost']} |",
        f"| resets on a killed worker's connections (sent again) | "
        f"{sum(n for k, n in c.items() if k.endswith('_reset_after_kill'))} |",
        f"| workers killed | {c.get('workers_killed', 0)} |",
        "| sentence requests answered 200 / p50 / p99 (from first send, waits after a 429 included) | "
        f"{c.get('sentence_200', 0)} / "
        f"{result['sentence_p50_ms']:.1f} ms / {result['sentence_p99_ms']:.1f} ms |",
        f"| document requests answered 200 | {c.get('document_200', 0)} |",
        f"| 429 met (queue full) by sentences / documents / filler | {c.get('sentence_429', 0)} / "
        f"{c.get('document_429', 0)} / {c.get('filler_429', 0)} |",
        f"| bad bodies answered 4xx / other | {c.get('bad_4xx', 0)} / "
        f"{sum(n for k, n in c.items() if k.startswith('bad_') and k.split('_')[1].isdigit() and k != 'bad_4xx')} |",
        f"| hostile connections closed by the server / left open | {c.get('hostile_closed', 0)} / "
        f"{c.get('hostile_open', 0)} |",
        f"| 1 MiB headers answered 431 / other | {c.get('header_431', 0)} / {c.get('header_other', 0)} |",
        f"| /health probes 200 / 503 / no answer, worst latency | {c.get('health_200', 0)} / "
        f"{c.get('health_503', 0)} / {c.get('health_0', 0)}, {result['health_worst_ms']:.0f} ms |",
        f"| /health after the load | {result['health_after']} |",
        "",
        "Resident memory (MiB), start and end (workers are new after kills: each row is one process):",
        "",
        "| process | start | end |",
        "| --- | --- | --- |",
    ]
    start_mem, end_mem = result["memory_start_mib"], result["memory_end_mib"]
    for name in sorted(set(start_mem) | set(end_mem)):
        lines.append(f"| {name} | {_mib(start_mem.get(name))} | {_mib(end_mem.get(name))} |")
    return "\n".join(lines) + "\n"


def _mib(value: float | None) -> str:
    return f"{value:.0f}" if value else "—"


if __name__ == "__main__":
    main()
