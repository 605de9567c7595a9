"""What bounding padding (`Engine.min_fill`) buys, engine alone, against the pipeline on the same texts.

For the engine `engine: auto` picks, on CoNLL dev: tokens/s of the engine on all sentences in
token-budget batches, and on requests of 8 paragraphs (200-400 tokens, as `make bench` sends them,
each request planned on its own as the scheduler would), once with `min_fill` 0 (batches filled to
the budget) and once with the engine's own `min_fill`; then the pipeline (float32, aggregation
"simple") on the same 8-paragraph requests. No HTTP. Prints one line per figure.

    .venv/bin/python bench/padding.py [--model minilm|bert-base] [--seconds 8] [--sentences 800]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from load import paragraphs, requests_of
from run import (
    DEFAULT_CONLL,
    DEFAULT_MODEL,
    _pipeline_throughput,
    bench_engine,
    build_bert_base,
    conll_sentences,
)


def requests_throughput(engine, requests: list[list[np.ndarray]], seconds: float, max_num_tokens: int) -> float:
    """Tokens/s of the engine answering `requests` in turn, each planned into batches on its own."""
    tokens, start, k = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        request = requests[k % len(requests)]
        k += 1
        lengths = np.array([len(s) for s in request])
        for batch in engine.batches(lengths, max_num_tokens):
            engine.logits([request[i] for i in batch.tolist()])
        tokens += int(lengths.sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sentences", type=int, default=800, help="CoNLL dev sentences used")
    parser.add_argument("--max-num-tokens", type=int, default=16384)
    args = parser.parse_args()
    from transformers import pipeline

    from nerserve.config import Settings
    from nerserve.engine.core import EngineCore

    path = (
        DEFAULT_MODEL
        if args.model == "minilm"
        else build_bert_base(DEFAULT_MODEL, Path(tempfile.mkdtemp(prefix="nerpadding-")) / "bert-base-random")
    )
    sents = conll_sentences(DEFAULT_CONLL)[0][: args.sentences]
    service = EngineCore(Settings(checkpoint=str(path)))
    tok, engine = service.tokenizer, service.engine
    sentence_ids = [x.ids for w in tok.encode(sents, False) for x in w]
    paras = paragraphs(sents, np.array([len(s) for s in sentence_ids]))
    paragraph_windows = tok.encode(paras, False)
    ntok = {p: sum(len(x.ids) for x in w) for p, w in zip(paras, paragraph_windows, strict=True)}
    paragraph_ids = [x.ids for w in paragraph_windows for x in w]
    requests = requests_of(paragraph_ids, 8)
    own = engine.min_fill
    print(
        f"{args.model}: engine {engine.name} {engine.precision}, padded={engine.padded}, "
        f"{len(sentence_ids)} sentences, {len(requests)} requests of 8 paragraphs",
        flush=True,
    )
    for min_fill in (0.0, own):
        engine.min_fill = min_fill
        sentences = bench_engine(engine, sentence_ids, args.seconds, args.max_num_tokens)["tokens_s"]
        paragraph = requests_throughput(engine, requests, args.seconds, args.max_num_tokens)
        print(
            f"min_fill {min_fill}: sentences {sentences:,.0f} tok/s, 8-paragraph requests {paragraph:,.0f} tok/s",
            flush=True,
        )
    service.close()
    import torch

    pipe = pipeline(
        "token-classification",
        model=str(path),
        aggregation_strategy="simple",
        device=0 if torch.cuda.is_available() else -1,
    )
    piped = _pipeline_throughput(pipe, requests_of(paras, 8), 8, ntok, args.seconds)["tokens_s"]
    print(f"pipeline (fp32) on the same 8-paragraph requests: {piped:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
