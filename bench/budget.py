"""The batch budget (`max_num_tokens`) the CPU engine defaults to, by measurement through the server.

A step of the engine process runs one batch of at most the budget at a time, and a request that arrives
waits for about one batch; a larger budget buys throughput only while the engine still gains from bigger
batches (and, for a padded engine, while more sequences of even length fit one). For each budget: the
server (`engine: auto`, one worker) under closed-loop load of 64-sentence and 8-paragraph requests, as
`make bench` sends them: tokens/s, and the engine's mean batch time (from /metrics). The default is the
smallest budget within 5% of the best throughput on both.

    .venv/bin/python bench/budget.py [--seconds 10] [--budgets 1024,2048,4096,16384]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from load import closed_loop, engine_batch_seconds, paragraphs, predict_requests, requests_of, server_env, start
from run import DEFAULT_CONLL, DEFAULT_MODEL, conll_sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--budgets", default="1024,2048,4096,16384")
    parser.add_argument("--sentences", type=int, default=1500)
    args = parser.parse_args()
    texts = conll_sentences(DEFAULT_CONLL)[0][: args.sentences]
    words = np.array([len(t.split()) * 1.4 + 2 for t in texts]).astype(int)  # about the model's tokens
    loads = {  # weighed in texts: closed_loop's "tokens_s" is then texts/s
        "sentences": predict_requests(requests_of(texts, 64), lambda _: 1),
        "paragraphs": predict_requests(requests_of(paragraphs(texts, words), 8), lambda _: 1),
    }
    print("| budget | sentences texts/s | batch mean ms | paragraphs texts/s | batch mean ms |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    rows = {}
    for budget in [int(b) for b in args.budgets.split(",")]:
        server = start(
            [sys.executable, "-m", "nerserve", "serve"],
            server_env(checkpoint=str(DEFAULT_MODEL), workers="1", max_num_tokens=str(budget)),
        )
        try:
            row = {}
            for name, load in loads.items():
                before = engine_batch_seconds(server.url)
                texts_s = closed_loop(server.port, load, 16, args.seconds)["tokens_s"]
                after = engine_batch_seconds(server.url)
                row[name] = (texts_s, 1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1))
            rows[budget] = row
            print(
                f"| {budget} | {row['sentences'][0]:.1f} | {row['sentences'][1]:.0f} | {row['paragraphs'][0]:.1f} | "
                f"{row['paragraphs'][1]:.0f} |",
                flush=True,
            )
        finally:
            server.stop()
    best = {name: max(row[name][0] for row in rows.values()) for name in loads}
    chosen = min(b for b, row in rows.items() if all(row[n][0] >= 0.95 * best[n] for n in loads))
    print(f"smallest budget within 5% of the best throughput on both: {chosen}")


if __name__ == "__main__":
    main()
