"""What one request costs a front-end worker in memory: the measurement behind `max_request_tokens`'s
default (README, Configuration).

One server (one worker, the shared real checkpoint, ONNX Runtime, the token limit out of the way),
then requests of growing size, each one long text of CoNLL-2003 dev words with `raw_scores` (strategy
none: every token with all its labels' logits, the largest answer per token there is) and, for
comparison, `simple`. Before each request the worker's peak RSS is reset (/proc/PID/clear_refs); after
it, the peak's growth over the RSS before is the request's cost, divided by its model tokens (windows
included, from /metrics: what the limit counts).

    PYTHONPATH=packages:bench .venv/bin/python bench/request_memory.py [--tokens 8192 32768 98304]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import httpx
from load import ROOT, server_env, start

CHECKPOINT = ROOT.parent / "shared" / "models" / "minilm-l6-conll03-ner"
CONLL_DEV = ROOT.parent / "shared" / "data" / "conll2003" / "eng.testa"


def _memory_kib(pid: int, field: str) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0])


def _tokens_total(url: str) -> float:
    match = re.search(r"^nerserve_tokens_total ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[8192, 32768, 98304], help="model tokens per request (about)"
    )
    parser.add_argument("--packages", default=str(ROOT / "packages"), help="the nerserve package folder to serve")
    args = parser.parse_args()
    words = [
        line.split()[0]
        for line in CONLL_DEV.read_text().splitlines()
        if line.strip() and not line.startswith("-DOCSTART-")
    ]
    env = server_env(
        CHECKPOINT=str(CHECKPOINT),
        ENGINE="onnxruntime",
        WORKERS="1",
        LOG_LEVEL="INFO",
        MAX_REQUEST_TOKENS="100000000",
        REQUEST_TIMEOUT_S="600",
    )
    env["PYTHONPATH"] = f"{args.packages}:{ROOT / 'bench'}"
    server = start([sys.executable, "-m", "nerserve", "serve"], env)
    try:
        probe = httpx.post(server.url + "/predict_tokens", json={"inputs": "probe"}, headers={"x-request-id": "probe"})
        probe.raise_for_status()
        line = next(line for line in server.log.read_text().splitlines() if '"request_id":"probe"' in line)
        worker = json.loads(line[line.index("{") :])["worker"]
        for target in args.tokens:
            # CoNLL words make about 1.7 model tokens each with this tokenizer, windows included
            text = " ".join(words[i % len(words)] for i in range(int(target / 1.7)))
            for strategy, raw in (("none", True), ("simple", False)):
                Path(f"/proc/{worker}/clear_refs").write_text("5")  # reset the peak RSS
                before_rss, before_tokens = _memory_kib(worker, "VmRSS"), _tokens_total(server.url)
                started = time.perf_counter()
                body = {"inputs": text, "aggregation_strategy": strategy, "raw_scores": raw}
                response = httpx.post(server.url + "/predict_tokens", json=body, timeout=300)
                seconds = time.perf_counter() - started
                response.raise_for_status()
                tokens = _tokens_total(server.url) - before_tokens
                growth = (_memory_kib(worker, "VmHWM") - before_rss) * 1024
                size = len(response.content)
                print(
                    f"{strategy:6} raw_scores={raw!s:5} tokens={int(tokens):>8,} "
                    f"peak RSS growth={growth / 2**20:7.1f} MiB ({growth / tokens:6.0f} B/token)  "
                    f"answer={size / 2**20:6.1f} MiB ({size / tokens:4.0f} B/token)  {seconds:5.1f} s",
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
