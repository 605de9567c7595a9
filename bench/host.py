"""The server's processes, measured over HTTP on this machine (part of `make bench`; no GPU needed).

Rows, each from real server processes in one run:
- host capacity: the server end to end with the model's cost taken out (its engine process answers
  from logits recorded before the run: replay_engine.py), at 1, 2, ... workers up to the cores:
  tokens/s, the cores the server's processes kept busy, and tokens/s per core (tokens per CPU-second
  of all of them: supervisor, engine process, workers). This is what a GPU would need from the host.
- the real engine (`engine: auto`: ONNX Runtime on a CPU) at the same worker counts, and beside it the
  single-process server as it was before the split (commit --baseline, run from `git archive`).
- mixed load: one-sentence requests while 1,600-sentence documents are being served: the sentences'
  p50 and p99 beside the engine's time for one batch and a sentence's own time alone; for this server
  and for the single-process one.
Requests are 64 CoNLL-2003 dev sentences or 8 paragraphs (200-400 tokens), strategy `simple`; tokens are
model tokens with [CLS]/[SEP]. A raw-socket closed-loop client (load.py) keeps `--connections` requests
in flight; its own CPU share is shown. Writes bench/results/<date>-<machine>-host.{json,md} and a chart
of tokens/s against workers (-host.png).

    PYTHONPATH=packages .venv/bin/python bench/host.py [--seconds 8] [--sentences 2000] [--workers 1,2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from load import (
    ROOT,
    closed_loop,
    engine_batch_seconds,
    free_port,
    paragraphs,
    predict_requests,
    requests_of,
    server_env,
    start,
    tree_cpu_seconds,
)
from replay_engine import REPLAY_FILE, record
from run import DEFAULT_CONLL, DEFAULT_MODEL, conll_sentences, machine_name

#: the last commit whose server was one process (the split into processes came after it)
SINGLE_PROCESS_COMMIT = "9acd544"
DOCUMENT_SENTENCES = 1600


def measure(server, requests: list[tuple[bytes, int]], seconds: float, connections: int) -> dict:
    """Closed-loop load on `server`, with the CPU its processes used meanwhile."""
    cpu = tree_cpu_seconds(server.process.pid)
    started = time.perf_counter()
    result = closed_loop(server.port, requests, connections, seconds)
    elapsed = time.perf_counter() - started
    cores = (tree_cpu_seconds(server.process.pid) - cpu) / elapsed
    result.update(server_cores=cores, tokens_s_per_core=result["tokens_s"] / max(cores, 1e-9))
    return result


def mixed(server, sentence_requests, document_requests, seconds: float, has_metrics: bool) -> dict:
    """One-sentence requests (one connection, one at a time) while documents are served (two connections)."""
    alone = closed_loop(server.port, sentence_requests, 1, min(seconds, 3.0))
    before = engine_batch_seconds(server.url) if has_metrics else (0.0, 0.0)
    background: dict = {}
    thread = threading.Thread(
        target=lambda: background.update(closed_loop(server.port, document_requests, 2, seconds + 4))
    )
    thread.start()
    time.sleep(2.0)  # the documents are in the engine
    foreground = closed_loop(server.port, sentence_requests, 1, seconds)
    thread.join()
    after = engine_batch_seconds(server.url) if has_metrics else (0.0, 0.0)
    sentences = sum(foreground["statuses"].values())
    # The documents' batches: the engine's time less the sentences' own batches (one each, at most their
    # time alone), over the batches that were not theirs.
    document_batches = after[1] - before[1] - sentences
    document_seconds = after[0] - before[0] - sentences * alone["p50_ms"] / 1e3
    return {
        "sentence_alone_p50_ms": alone["p50_ms"],
        "sentence_p50_ms": foreground["p50_ms"],
        "sentence_p99_ms": foreground["p99_ms"],
        "sentences": sentences,
        "documents": sum(background["statuses"].values()),
        "document_p50_ms": background["p50_ms"],
        "document_batch_ms": 1e3 * document_seconds / document_batches if has_metrics and document_batches else None,
    }


def single_process_server(commit: str, folder: Path, checkpoint: str) -> tuple[list[str], dict[str, str], Path]:
    """The server as it was at `commit` (one process), unpacked from git, with that version's settings."""
    archive = folder / "baseline.tar"
    subprocess.run(
        ["git", "archive", "-o", str(archive), commit, "packages", "model", "config.yaml"], cwd=ROOT, check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "baseline", filter="data")
    root = folder / "baseline"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERSERVE_")}
    env.update(
        PYTHONPATH=str(root / "packages"),
        NERSERVE_CONFIG=str(root / "config.yaml"),
        PORT=str(free_port()),
        CHECKPOINT=checkpoint,
        ENGINE="onnxruntime",
        LOG_LEVEL="WARNING",
    )
    return [sys.executable, "-m", "nerserve", "serve"], env, root


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m.get('gpu') or 'no GPU'} | CPU {m['cpu']} x{m['cores']} | {results['date']} | "
        f"model {results['model']} | budget: this server {results['budget']}, single-process 16384",
        "",
        "| server | workers | requests | tokens/s | server cores busy | tokens/s per core | p50 ms | p99 ms "
        "| client cores |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        r = row["result"]
        lines.append(
            f"| {row['server']} | {row['workers']} | {row['requests']} | {r['tokens_s']:,.0f} | "
            f"{r['server_cores']:.2f} | {r['tokens_s_per_core']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['client_cores']:.2f} |"
        )
    lines += [
        "",
        "| mixed load | sentence alone p50 ms | sentence p50 ms | sentence p99 ms | one document batch ms "
        "| sentences | documents (p50 ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["mixed"].items():
        batch = f"{r['document_batch_ms']:.0f}" if r["document_batch_ms"] is not None else "n/a"
        lines.append(
            f"| {name} | {r['sentence_alone_p50_ms']:.1f} | {r['sentence_p50_ms']:.1f} | "
            f"{r['sentence_p99_ms']:.1f} | {batch} | {r['sentences']} | {r['documents']} "
            f"({r['document_p50_ms']:,.0f}) |"
        )
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for server, style in (("host capacity (replayed logits)", "o-"), ("real engine", "s--")):
        for requests in ("sentences", "paragraphs"):
            rows = [r for r in results["rows"] if r["server"] == server and r["requests"] == requests]
            if rows:
                axis.plot(
                    [r["workers"] for r in rows],
                    [r["result"]["tokens_s"] for r in rows],
                    style,
                    label=f"{server}, {requests}",
                )
    for r in (r for r in results["rows"] if r["server"] == "single process (before)"):
        axis.scatter(
            [1], [r["result"]["tokens_s"]], marker="x", s=60, label=f"single process (before), {r['requests']}"
        )
    axis.set_xlabel("front-end worker processes")
    axis.set_ylabel("tokens/s over HTTP (log scale)")
    axis.set_yscale("log")
    axis.set_xticks(sorted({r["workers"] for r in results["rows"]}))
    axis.set_title(f"{results['model']} on {results['machine']['cpu']} x{results['machine']['cores']}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--sentences", type=int, default=2000, help="CoNLL dev sentences used")
    parser.add_argument("--workers", default=None, help="worker counts, e.g. 1,2 (default: 1 up to the cores)")
    parser.add_argument("--connections", type=int, default=16, help="requests kept in flight")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--baseline", default=SINGLE_PROCESS_COMMIT, help="commit of the single-process server")
    parser.add_argument("--quick", action="store_true", help="3 s per measurement, 800 sentences")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--chart", type=Path, default=None, help="only redraw the chart of a results JSON")
    args = parser.parse_args()
    if args.chart:
        chart(json.loads(args.chart.read_text()), args.chart.with_suffix(".png"))
        return
    if args.quick:
        args.seconds, args.sentences = 3.0, 800
    from nerserve.config import Settings
    from nerserve.engine.core import EngineCore
    from nerserve.platform import usable_cores
    from nerserve.text.frontend import WARMUP

    counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, usable_cores() + 1))
    texts = conll_sentences(DEFAULT_CONLL)[0]
    sentences = texts[: args.sentences]
    folder = Path(tempfile.mkdtemp(prefix="nerbench-host-"))
    service = EngineCore(Settings(checkpoint=str(args.checkpoint), engine="onnxruntime"))
    service.scheduler.close()
    tokenizer = service.tokenizer
    tokens_of = {
        t: sum(len(w.ids) for w in ws) for t, ws in zip(sentences, tokenizer.encode(sentences, False), strict=True)
    }
    paras = paragraphs(sentences, np.array([tokens_of[s] for s in sentences]))
    tokens_of.update(
        {p: sum(len(w.ids) for w in ws) for p, ws in zip(paras, tokenizer.encode(paras, False), strict=True)}
    )
    documents = [" ".join(texts[k : k + DOCUMENT_SENTENCES]) for k in (0, DOCUMENT_SENTENCES)]
    print(f"recording the engine's logits for {len(sentences)} sentences and {len(paras)} paragraphs", flush=True)
    windows = tokenizer.encode(sentences + paras + WARMUP["inputs"], False)  # and what each process warms up with
    replay = record(service.engine, [w.ids for ws in windows for w in ws], folder / "replay.pkl")
    budget = service.engine.max_num_tokens
    service.engine.close()

    loads = {
        "sentences": predict_requests(requests_of(sentences, 64), tokens_of.__getitem__),
        "paragraphs": predict_requests(requests_of(paras, 8), tokens_of.__getitem__),
    }
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "model": args.checkpoint.name,
        "budget": budget,
        "seconds": args.seconds,
        "rows": [],
        "mixed": {},
    }

    def run_server(name: str, command: list[str], env: dict[str, str], workers: int) -> None:
        server = start(command, env)
        try:
            for requests, load in loads.items():
                result = measure(server, load, args.seconds, args.connections)
                results["rows"].append({"server": name, "workers": workers, "requests": requests, "result": result})
                print(
                    f"{name}, {workers} workers, {requests}: {result['tokens_s']:,.0f} tok/s, "
                    f"{result['server_cores']:.2f} server cores, {result['tokens_s_per_core']:,.0f} tok/s/core, "
                    f"client {result['client_cores']:.2f} cores, statuses {result['statuses']}",
                    flush=True,
                )
        finally:
            server.stop()

    checkpoint = str(args.checkpoint)
    for workers in counts:
        env = {
            **server_env(checkpoint=checkpoint, workers=str(workers), engine="onnxruntime"),
            REPLAY_FILE: str(replay),
        }
        run_server(
            "host capacity (replayed logits)", [sys.executable, str(ROOT / "bench" / "replay_server.py")], env, workers
        )
        run_server(
            "real engine",
            [sys.executable, "-m", "nerserve", "serve"],
            server_env(checkpoint=checkpoint, workers=str(workers), engine="onnxruntime"),
            workers,
        )
    command, env, _ = single_process_server(args.baseline, folder, checkpoint)
    run_server("single process (before)", command, env, 1)

    one = predict_requests([[s] for s in sentences[:500]], tokens_of.__getitem__)
    docs = predict_requests([[d] for d in documents], lambda _: 0)
    for name, (command, env, metrics) in {
        "this server": (
            [sys.executable, "-m", "nerserve", "serve"],
            server_env(checkpoint=checkpoint, engine="onnxruntime"),
            True,
        ),
        "single process (before)": (
            *single_process_server(args.baseline, Path(tempfile.mkdtemp()), checkpoint)[:2],
            False,
        ),
    }.items():
        server = start(command, env)
        try:
            results["mixed"][name] = mixed(server, one, docs, max(args.seconds, 10.0), metrics)
            print(f"mixed load, {name}: {results['mixed'][name]}", flush=True)
        finally:
            server.stop()

    tag = (results["machine"].get("gpu") or results["machine"]["cpu"]).replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{tag}-host.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    out.with_suffix(".md").write_text(text + "\n")
    chart(results, out.with_suffix(".png"))
    print("\n" + text, f"\nwrote {out}, {out.with_suffix('.md').name}, {out.with_suffix('.png').name}", sep="\n")


if __name__ == "__main__":
    main()
