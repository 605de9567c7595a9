"""`nerserve eval` measured (part of `make bench`): its rate beside `nerserve tag`'s, and its F1 beside the
build's, on CoNLL-2003 dev, in one run on the machine it runs on.

1. Rate: `nerserve serve` (the shared MiniLM checkpoint, ONNX Runtime fp32) and, alternately (`--rounds`
   times each, so drift on a shared machine falls on both), `nerserve tag` on the dev sentences as JSONL
   and `nerserve eval` on the dev CoNLL file itself (the same sentences, joined by single spaces), both
   `--url` and strategy `none`. Each rate is rows over the time its summary reports (the model ready to
   the end), the median of its rounds; target: eval at least 0.9x tag.
2. F1: the report's micro F1 beside the figure bench/run.py reports for the engine (the int8 build's
   check, export/word_f1.py: each word's first sub-token on the graph the server serves); target: equal.

Writes bench/results/<date>-<cpu>-eval.{json,md}.

    PYTHONPATH=packages .venv/bin/python bench/eval.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import orjson
from load import ROOT, server_env, start
from run import DEFAULT_CONLL, DEFAULT_MODEL, machine_name

warnings.filterwarnings("ignore")
ELAPSED = re.compile(r"nerserve (?:tag|eval): ([0-9,]+) rows in ([0-9.]+) s")


def run(command: str, args: list[str]) -> dict:
    """`python -m nerserve COMMAND ARGS` to the end: rows and seconds from its summary, the wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nerserve", command, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"nerserve {command} failed: {done.stderr[-2000:]}")
    found = ELAPSED.search(done.stderr)
    assert found is not None, done.stderr
    rows, seconds = int(found.group(1).replace(",", "")), float(found.group(2))
    return {"rows": rows, "elapsed_s": seconds, "wall_s": wall, "rows_s": rows / seconds}


def build_f1(checkpoint_path: Path, conll: Path) -> float:
    """The F1 bench/run.py reports (from the int8 build's check), on the fp32 graph the server serves."""
    from nerserve.checkpoint import load_checkpoint
    from nerserve.config import Settings
    from nerserve.evaluation.gold import read_conll
    from nerserve.export.startup import served_artefact
    from nerserve.export.word_f1 import conll_f1

    checkpoint = load_checkpoint(str(checkpoint_path))
    artefact = served_artefact(Settings(checkpoint=str(checkpoint_path), engine="onnxruntime"), checkpoint)
    assert artefact is not None
    return conll_f1(artefact.path, checkpoint, read_conll(conll), "fp32")


def table(results: dict) -> str:
    tag, evaluate = results["tag"], results["eval"]
    return "\n".join(
        [
            "| | rows/s (median) | rounds (rows/s) |",
            "| --- | ---: | ---: |",
            f"| `nerserve tag --url`, strategy none | {tag['rows_s']:,.0f} | "
            f"{', '.join(f'{r:,.0f}' for r in tag['rounds'])} |",
            f"| `nerserve eval --url`, strategy none | {evaluate['rows_s']:,.0f} ({results['rate_ratio']:.2f}x tag) | "
            f"{', '.join(f'{r:,.0f}' for r in evaluate['rounds'])} |",
            "",
            f"micro F1: `nerserve eval` {results['eval_f1']:.6f}, the build's check (bench/run.py's figure) "
            f"{results['build_f1']:.6f}: {'equal' if results['f1_equal'] else 'DIFFERENT'}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--conll", type=Path, default=DEFAULT_CONLL)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from nerserve.evaluation.gold import read_conll

    folder = Path(tempfile.mkdtemp(prefix="nerbench-eval-"))
    sentences = [" ".join(words) for words, _ in read_conll(args.conll)]
    corpus = folder / "dev.jsonl"
    corpus.write_bytes(b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in enumerate(sentences)))
    server = start(
        [sys.executable, "-m", "nerserve", "serve"], server_env(checkpoint=str(args.checkpoint), engine="onnxruntime")
    )
    common = ["--url", server.url, "--aggregation-strategy", "none"]
    runs: dict[str, list[dict]] = {"tag": [], "eval": []}
    report = folder / "report.json"
    try:
        for _ in range(args.rounds):
            out = folder / "tagged.jsonl"
            runs["tag"].append(run("tag", [str(corpus), "-o", str(out), "--overwrite", *common]))
            runs["eval"].append(run("eval", [str(args.conll), "--report", str(report), *common]))
            print(
                f"tag {runs['tag'][-1]['rows_s']:,.0f} rows/s, eval {runs['eval'][-1]['rows_s']:,.0f} rows/s",
                flush=True,
            )
    finally:
        server.stop()
    eval_f1 = orjson.loads(report.read_bytes())["micro"]["f1"]
    f1 = build_f1(args.checkpoint, args.conll)
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "model": args.checkpoint.name,
        "data": args.conll.name,
        "sentences": len(sentences),
        "strategy": "none",
        **{
            name: {
                "rows_s": statistics.median(r["rows_s"] for r in rounds),
                "rounds": [r["rows_s"] for r in rounds],
                "runs": rounds,
            }
            for name, rounds in runs.items()
        },
        "eval_f1": eval_f1,
        "build_f1": f1,
        "f1_equal": abs(eval_f1 - f1) < 1e-12,
    }
    results["rate_ratio"] = results["eval"]["rows_s"] / results["tag"]["rows_s"]
    text = table(results)
    print(text)
    cpu = results["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{cpu}-eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    header = (
        f"# nerserve eval on {results['data']} ({results['sentences']:,} sentences), {results['model']}, "
        f"{results['machine']['cpu']} ({results['machine']['cores']} cores)\n\n"
    )
    out.with_suffix(".md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
