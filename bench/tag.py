"""`nerserve tag` measured (part of `make bench`), every ratio from the same run on the same machine.

On CoNLL-2003 dev sentences (the first --sentences), strategy `simple` everywhere (as bench/run.py),
tokens counted with the model's tokenizer ([CLS]/[SEP] included):
1. over HTTP against `nerserve serve` (the shared MiniLM checkpoint, ONNX Runtime): the tool's
   tokens/s beside the server's own closed-loop throughput on the same texts (bench/load.py, requests of
   64 sentences, --connections in flight; target: the tool at least 0.9x) and beside
   `transformers.pipeline` with batch_size 64 (target: at least 2.5x);
2. the tool's own CPU per token against bench/replay_server.py (the server answering from recorded
   logits, so it is not the bottleneck): the tag process's user+system CPU from wait4, the whole process
   and past its start-up (the difference between a large and a one-row input); target: at least 500k
   tokens per second of the tool's CPU;
3. in process (`--checkpoint`, the engine in the tag process) beside the engine alone on the same
   texts' token ids in its own budget batches (target: at least 0.9x), and on Ray with 2 actors (a
   local cluster the tool starts);
4. resume: a run over HTTP killed with SIGKILL at about half way and rerun, its output compared with
   the uninterrupted run's (ids and order, errors, spans and labels exact; scores, the largest difference).
The tool's tokens/s are its rows' tokens over the time its summary reports (from the model being
ready to the output being complete); the whole process's wall time is printed beside it. Writes
bench/results/<date>-<cpu>-tag.{json,md}.

    PYTHONPATH=packages .venv/bin/python bench/tag.py [--sentences 2000] [--seconds 10] [--repeat 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import orjson
from load import ROOT, closed_loop, predict_requests, server_env, start
from replay_engine import REPLAY_FILE, record
from run import DEFAULT_CONLL, DEFAULT_MODEL, _pipeline_throughput, bench_engine, conll_sentences, machine_name

warnings.filterwarnings("ignore")
ELAPSED = re.compile(r"rows(?: \(\+[0-9,]+ from an earlier run\))? in ([0-9.]+) s")


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in enumerate(texts)))
    return path


def run_tool(args: list[str]) -> dict:
    """`python -m nerserve tag ARGS` to the end: wall time, its summary's time, its own CPU (wait4)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "nerserve", "tag", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"nerserve tag failed: {stderr[-2000:]}")
    found = ELAPSED.search(stderr)
    return {
        "wall_s": wall,
        "elapsed_s": float(found.group(1)) if found else wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "summary": stderr.strip().splitlines()[-2:],
    }


def rate(tokens: int, run: dict) -> dict:
    return {**run, "tokens": tokens, "tokens_s": tokens / run["elapsed_s"], "tokens_s_wall": tokens / run["wall_s"]}


def rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def compare(got: list[dict], want: list[dict]) -> dict:
    """Equal ids in order, errors, spans and labels; the largest score difference."""
    same = [a["id"] for a in got] == [b["id"] for b in want] and all(
        a["error"] == b["error"] for a, b in zip(got, want, strict=True)
    )
    largest = 0.0
    for a, b in zip(got, want, strict=True):
        ea, eb = a["entities"] or [], b["entities"] or []
        pairs = list(zip(ea, eb, strict=False))
        labels = [({**x, "results": list(x["results"])}, {**y, "results": list(y["results"])}) for x, y in pairs]
        same = same and len(ea) == len(eb) and all(x == y for x, y in labels)
        for x, y in pairs:
            for label in x["results"]:
                largest = max(largest, abs(x["results"][label] - y["results"].get(label, float("inf"))))
    return {"equal": same, "rows": len(got), "max_score_diff": largest}


def killed_and_rerun(args: list[str], out: Path, total: int) -> dict:
    """SIGKILL once about half the rows are committed, then the same command again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}
    state = out.with_name(out.name + ".state.json")
    process = subprocess.Popen([sys.executable, "-m", "nerserve", "tag", *args], env=env, stderr=subprocess.DEVNULL)
    killed_at = 0
    while process.poll() is None:
        if state.exists() and (killed_at := orjson.loads(state.read_bytes())["rows"]) >= total // 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    if killed_at >= total:
        raise RuntimeError("the run ended before it was killed")
    return {"killed_at_rows": killed_at, "rerun": run_tool(args)}


def table(results: dict) -> str:
    m, r = results["machine"], results
    http, ratio = r["http"], r["ratios"]
    lines = [
        f"machine: CPU {m['cpu']} x{m['cores']} | {m.get('gpu') or 'no GPU'} | {r['date']} | {r['sentences']} CoNLL "
        f"dev sentences, {r['tokens']:,} tokens | model {r['model']}",
        "",
        "| measure | tokens/s | ratio | target |",
        "| --- | ---: | ---: | --- |",
        f"| server closed loop (64 sentences/request, {http['closed_loop']['connections']} connections) | "
        f"{http['closed_loop']['tokens_s']:,.0f} | | |",
        f"| `nerserve tag --url` (whole process: {http['tool']['tokens_s_wall']:,.0f}) | "
        f"{http['tool']['tokens_s']:,.0f} | {ratio['tool_vs_closed_loop']:.2f}x closed loop | >= 0.9x |",
        f"| transformers.pipeline, batch 64 | {http['pipeline_b64']['tokens_s']:,.0f} | "
        f"{ratio['tool_vs_pipeline']:.2f}x (tool / pipeline) | >= 2.5x |",
        f"| tool's CPU against the replay server, past start-up ({r['client']['tokens']:,} tokens) | "
        f"{r['client']['tokens_per_cpu_s']:,.0f} per CPU-second | whole process: "
        f"{r['client']['tokens_per_cpu_s_whole']:,.0f} | >= 500k |",
        f"| engine alone ({r['engine']['engine']}) | {r['engine']['tokens_s']:,.0f} | | |",
        f"| `nerserve tag` in process | {r['in_process']['tokens_s']:,.0f} | {ratio['in_process_vs_engine']:.2f}x "
        "engine alone | >= 0.9x |",
        f"| `nerserve tag --ray` (2 actors, local cluster) | {r['ray']['tokens_s']:,.0f} | "
        f"{ratio['ray_vs_in_process']:.2f}x in process | the figure |",
        "",
        f"resume: killed (SIGKILL) at {r['resume']['killed_at_rows']:,} of {r['sentences']:,} rows, rerun: output "
        f"{'equal' if r['resume']['compare']['equal'] else 'NOT equal'} to the uninterrupted run (ids, order, "
        f"errors, spans, labels; largest score difference {r['resume']['compare']['max_score_diff']:.1e})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--conll", type=Path, default=DEFAULT_CONLL)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per closed-loop / pipeline measure")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=40, help="copies of the sentences for the CPU measure")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from nerserve.config import Settings
    from nerserve.engine.core import EngineCore
    from nerserve.text.frontend import WARMUP

    sentences = conll_sentences(args.conll)[0][: args.sentences]
    folder = Path(tempfile.mkdtemp(prefix="nerbench-tag-"))
    checkpoint = str(args.checkpoint)
    service = EngineCore(Settings(checkpoint=checkpoint, engine="onnxruntime"))
    windows = service.tokenizer.encode(sentences, False)
    tokens_of = {t: sum(len(w.ids) for w in ws) for t, ws in zip(sentences, windows, strict=True)}
    tokens = sum(tokens_of[t] for t in sentences)
    sequences = [w.ids for ws in windows for w in ws]
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "model": args.checkpoint.name,
        "sentences": len(sentences),
        "tokens": tokens,
        "strategy": "simple",
    }
    print(f"{len(sentences)} sentences, {tokens:,} tokens", flush=True)
    warm = service.tokenizer.encode(WARMUP["inputs"], False)
    replay = record(service.engine, sequences + [w.ids for ws in warm for w in ws], folder / "replay.pkl")
    service.close()
    del service

    corpus = write_corpus(folder / "corpus.jsonl", sentences)
    common = ["--aggregation-strategy", "simple"]
    server = start([sys.executable, "-m", "nerserve", "serve"], server_env(checkpoint=checkpoint, engine="onnxruntime"))
    try:
        requests = predict_requests(
            [sentences[i : i + 64] for i in range(0, len(sentences), 64)], tokens_of.__getitem__
        )
        http: dict = {"closed_loop": closed_loop(server.port, requests, args.connections, args.seconds)}
        print(f"server closed loop: {http['closed_loop']['tokens_s']:,.0f} tok/s", flush=True)
        reference = folder / "http.jsonl"
        http["tool"] = rate(tokens, run_tool([str(corpus), "-o", str(reference), "--url", server.url, *common]))
        print(f"tool over HTTP: {http['tool']['tokens_s']:,.0f} tok/s; {http['tool']['summary']}", flush=True)
        resumed = folder / "resumed.jsonl"
        results["resume"] = killed_and_rerun(
            # requests of 32 rows and commits every 0.1 s, so the kill lands near half way
            [
                str(corpus),
                "-o",
                str(resumed),
                "--url",
                server.url,
                "--batch-rows",
                "32",
                "--commit-every",
                "0.1",
                *common,
            ],
            resumed,
            len(sentences),
        )
        results["resume"]["compare"] = compare(rows(resumed), rows(reference))
        print(f"resume: {results['resume']['killed_at_rows']} rows, then {results['resume']['compare']}", flush=True)
    finally:
        server.stop()

    from transformers import pipeline

    pipe = pipeline("token-classification", model=checkpoint, aggregation_strategy="simple", device=-1)
    chunks = [sentences[i : i + 256] for i in range(0, len(sentences), 256)]
    http["pipeline_b64"] = _pipeline_throughput(pipe, chunks, 64, tokens_of, args.seconds)
    del pipe
    print(f"pipeline b64: {http['pipeline_b64']['tokens_s']:,.0f} tok/s", flush=True)
    results["http"] = http

    replay_env = {**server_env(checkpoint=checkpoint, engine="onnxruntime"), REPLAY_FILE: str(replay)}
    server = start([sys.executable, str(ROOT / "bench" / "replay_server.py")], replay_env)
    try:
        big = write_corpus(folder / "big.jsonl", sentences * args.repeat)
        one = write_corpus(folder / "one.jsonl", sentences[:1])
        large = run_tool([str(big), "-o", str(folder / "big-out.jsonl"), "--url", server.url, *common])
        small = run_tool([str(one), "-o", str(folder / "one-out.jsonl"), "--url", server.url, *common])
    finally:
        server.stop()
    big_tokens = tokens * args.repeat
    results["client"] = {
        "tokens": big_tokens,
        "large": large,
        "one_row": small,
        "tokens_per_cpu_s_whole": big_tokens / large["cpu_s"],
        "tokens_per_cpu_s": (big_tokens - tokens_of[sentences[0]]) / (large["cpu_s"] - small["cpu_s"]),
        "tokens_s_against_replay": big_tokens / large["elapsed_s"],
    }
    print(f"client CPU: {results['client']['tokens_per_cpu_s']:,.0f} tokens per CPU-second", flush=True)

    # the engine alone just before the tool in process, so both see the machine in the same state
    service = EngineCore(Settings(checkpoint=checkpoint, engine="onnxruntime"))
    results["engine"] = {
        "engine": service.engine.name,
        **bench_engine(service.engine, sequences, args.seconds, service.engine.max_num_tokens),
    }
    service.close()
    del service
    print(f"engine alone: {results['engine']['tokens_s']:,.0f} tok/s", flush=True)
    model = ["--checkpoint", checkpoint, "--engine", "onnxruntime", *common]
    results["in_process"] = rate(tokens, run_tool([str(corpus), "-o", str(folder / "local.jsonl"), *model]))
    print(f"in process: {results['in_process']['tokens_s']:,.0f} tok/s", flush=True)
    results["ray"] = rate(
        tokens, run_tool([str(corpus), "-o", str(folder / "ray.jsonl"), "--ray", "--concurrency", "2", *model])
    )
    print(f"ray, 2 actors: {results['ray']['tokens_s']:,.0f} tok/s", flush=True)
    results["in_process_equal_http"] = compare(rows(folder / "local.jsonl"), rows(reference))
    results["ray_equal_http"] = compare(rows(folder / "ray.jsonl"), rows(reference))

    results["ratios"] = {
        "tool_vs_closed_loop": http["tool"]["tokens_s"] / http["closed_loop"]["tokens_s"],
        "tool_vs_pipeline": http["tool"]["tokens_s"] / http["pipeline_b64"]["tokens_s"],
        "in_process_vs_engine": results["in_process"]["tokens_s"] / results["engine"]["tokens_s"],
        "ray_vs_in_process": results["ray"]["tokens_s"] / results["in_process"]["tokens_s"],
    }
    cpu = results["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{cpu}-tag.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text, f"\nwrote {out}", sep="\n")


if __name__ == "__main__":
    main()
