"""The HTTP rate before and after a change, in one run on one machine (part of `make bench`).

Two servers of the shared checkpoint (ONNX Runtime, their default workers): the tree at `--baseline`
(unpacked with `git archive`) and the working tree, both started before any load, then measured in
turns (baseline, current, baseline, ...) so that a busy machine weighs on both alike, with the bench's
closed-loop client (load.py) keeping 16 requests of 64 CoNLL dev sentences (strategy `simple`) in
flight, as bench/run.py's HTTP row does; and transformers' pipeline on the same sentences (batch 64)
for the ratio the README quotes. Writes bench/results/<date>-<cpu>-http-rate.{json,md}.

    PYTHONPATH=packages .venv/bin/python bench/http_rate.py [--baseline 8d03307] [--rounds 3] [--seconds 8]
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
from pathlib import Path

import numpy as np
from load import ROOT, closed_loop, predict_requests, requests_of, server_env, start
from run import DEFAULT_CONLL, DEFAULT_MODEL, _pipeline_throughput, conll_sentences, machine_name

#: the tree before issue 24's limits (connections, tokens per request, the engine's sending threads)
BASELINE = "8d03307"


def archived_tree(commit: str, folder: Path) -> Path:
    """The package and config of `commit`, unpacked under `folder`."""
    archive = folder / "tree.tar"
    subprocess.run(["git", "archive", "-o", str(archive), commit, "packages", "config.yaml"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()

    from transformers import AutoTokenizer, pipeline

    sentences = conll_sentences(DEFAULT_CONLL)[0]
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    ntok = {text: len(ids) for text, ids in zip(sentences, tokenizer(sentences)["input_ids"], strict=True)}
    requests = predict_requests(requests_of(sentences, 64), ntok.__getitem__)
    pipe = pipeline("token-classification", model=str(args.checkpoint), aggregation_strategy="simple", device=-1)
    chunks = [sentences[i : i + 256] for i in range(0, len(sentences), 256)]  # as bench/run.py's b64 row
    pipeline_b64 = _pipeline_throughput(pipe, chunks, 64, ntok, args.seconds)
    del pipe

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as folder:
        baseline_root = archived_tree(args.baseline, Path(folder))
        roots = {f"baseline {args.baseline}": baseline_root, f"current {commit.stdout.strip()}": ROOT}
        servers = {}
        try:
            for name, root in roots.items():
                env = server_env(CHECKPOINT=str(args.checkpoint), ENGINE="onnxruntime")
                env.update(PYTHONPATH=str(root / "packages"), NERSERVE_CONFIG=str(root / "config.yaml"))
                servers[name] = start([sys.executable, "-m", "nerserve", "serve"], env, cwd=root)
            rates: dict[str, list[float]] = {name: [] for name in servers}
            statuses: dict[str, dict] = {name: {} for name in servers}
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    result = closed_loop(server.port, requests, args.connections, args.seconds)
                    rates[name].append(result["tokens_s"])
                    for status, count in result["statuses"].items():
                        statuses[name][status] = statuses[name].get(status, 0) + count
                    print(f"round {round_ + 1} {name}: {result['tokens_s']:,.0f} tokens/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    medians = {name: float(np.median(values)) for name, values in rates.items()}
    baseline_name, current_name = list(medians)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine_name(),
        "checkpoint": args.checkpoint.name,
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "pipeline_b64_tokens_s": pipeline_b64["tokens_s"],
        "tokens_s": rates,
        "median_tokens_s": medians,
        "statuses": statuses,
        "current_vs_baseline": medians[current_name] / medians[baseline_name],
        "vs_pipeline": {name: rate / pipeline_b64["tokens_s"] for name, rate in medians.items()},
    }
    cpu = result["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    stem = ROOT / "bench" / "results" / f"{result['date']}-{cpu}-http-rate"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# HTTP rate, before and after, one run",
        "",
        f"machine: CPU {m['cpu']} x{m['cores']}, no GPU | {result['date']} | {result['checkpoint']}, ONNX Runtime, "
        f"default workers | {args.connections} connections, requests of 64 CoNLL dev sentences (`simple`) | "
        f"{args.rounds} rounds of {args.seconds:g} s each, in turns | `bench/http_rate.py`",
        "",
        "| server | tokens/s (median) | each round | vs pipeline b64 | statuses |",
        "| --- | --- | --- | --- | --- |",
        f"| pipeline b64 | {pipeline_b64['tokens_s']:,.0f} | | 1.00x | |",
    ]
    for name in medians:
        each = ", ".join(f"{value:,.0f}" for value in rates[name])
        lines.append(
            f"| {name} | {medians[name]:,.0f} | {each} | {result['vs_pipeline'][name]:.2f}x | {statuses[name]} |"
        )
    lines += ["", f"current / baseline: **{result['current_vs_baseline']:.3f}**", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
