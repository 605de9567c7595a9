"""The Hugging Face route (`POST /`) and the Presidio recognizer measured, each figure beside its baseline
from the same run on the same machine (issue 25). About two minutes with the defaults.

On CoNLL-2003 dev sentences (the first --sentences), the shared MiniLM checkpoint on ONNX Runtime:
1. equality: `huggingface_hub.InferenceClient(model=URL).token_classification` against
   `transformers.pipeline("token-classification")` on the first --equal sentences, every strategy
   (labels, word, offsets, index exactly; the largest score difference);
2. throughput: `POST /` beside `POST /predict_tokens` in closed loop (bench/load.py: requests of 64
   sentences, strategy simple, --connections in flight), in short alternating rounds, each HF round
   compared with the /predict_tokens round just before it and the median of those ratios kept (the
   machine is shared: its speed drifts between rounds; target: the HF route within 10%);
3. Presidio: BatchAnalyzerEngine over the sentences with NerServeRecognizer against that server (a
   blank spaCy pipeline as Presidio's NLP engine), beside Presidio's own TransformersNlpEngine running
   the same checkpoint in process (its transformers config: max, stride 16, expand); both with
   Presidio's predefined recognizers loaded as an AnalyzerEngine loads them, texts per second, and how
   many PERSON/LOCATION/ORGANIZATION results the two share exactly.
Writes bench/results/<date>-<cpu>-hf-api.{json,md}.

    PYTHONPATH=packages .venv/bin/python bench/hf_api.py [--sentences 500] [--equal 50] [--seconds 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import orjson
from load import ROOT, closed_loop, request_bytes, server_env, start
from run import DEFAULT_CONLL, DEFAULT_MODEL, conll_sentences, machine_name

warnings.filterwarnings("ignore")
STRATEGIES = ("none", "simple", "first", "average", "max")
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION")


def equality(url: str, checkpoint: str, texts: list[str]) -> dict:
    """The client's answers against the pipeline's, every strategy: items compared, all equal or not."""
    from huggingface_hub import InferenceClient
    from transformers import pipeline

    client = InferenceClient(model=url)
    oracle = pipeline("token-classification", model=checkpoint, device=-1)
    out = {}
    for strategy in STRATEGIES:
        items, worst, equal = 0, 0.0, True
        for text, want in zip(texts, oracle(texts, aggregation_strategy=strategy), strict=True):
            got = [
                {k: v for k, v in vars(e).items() if v is not None}
                for e in client.token_classification(text, aggregation_strategy=strategy)
            ]
            strip = [{k: v for k, v in item.items() if k != "score"} for item in want]
            equal &= [{k: v for k, v in item.items() if k != "score"} for item in got] == strip
            worst = max([worst, *(abs(a["score"] - float(b["score"])) for a, b in zip(got, want, strict=False))])
            items += len(want)
        out[strategy] = {"texts": len(texts), "items": items, "equal": equal, "max_score_diff": worst}
        print(f"equality {strategy}: {out[strategy]}", flush=True)
    return out


def routes(port: int, sentences: list[str], tokens: list[int], seconds: float, connections: int, count: int) -> dict:
    """Closed loop on each route in alternating rounds: tokens/s per round and their means."""
    chunks = [(sentences[i : i + 64], sum(tokens[i : i + 64])) for i in range(0, len(sentences), 64)]
    bodies = {
        "predict_tokens": [
            (request_bytes("/predict_tokens", orjson.dumps({"inputs": c, "aggregation_strategy": "simple"})), n)
            for c, n in chunks
        ],
        "hf": [
            (request_bytes("/", orjson.dumps({"inputs": c, "parameters": {"aggregation_strategy": "simple"}})), n)
            for c, n in chunks
        ],
    }
    rounds: dict[str, list[dict]] = {"predict_tokens": [], "hf": []}
    for _ in range(count):
        for name, requests in bodies.items():
            result = closed_loop(port, requests, connections, seconds)
            assert set(result["statuses"]) == {200}, result["statuses"]
            rounds[name].append(result)
            print(f"{name}: {result['tokens_s']:,.0f} tok/s", flush=True)
    means = {name: sum(r["tokens_s"] for r in results) / len(results) for name, results in rounds.items()}
    # each HF round beside the /predict_tokens round just before it: the machine's drift (it is shared)
    # moves both, so the median of these ratios says more than the ratio of the means
    paired = sorted(h["tokens_s"] / p["tokens_s"] for p, h in zip(rounds["predict_tokens"], rounds["hf"], strict=True))
    return {
        "rounds": rounds,
        "mean_tokens_s": means,
        "paired_ratios": paired,
        "hf_vs_predict_tokens": paired[len(paired) // 2]
        if len(paired) % 2
        else sum(paired[len(paired) // 2 - 1 : len(paired) // 2 + 1]) / 2,
        "hf_vs_predict_tokens_of_means": means["hf"] / means["predict_tokens"],
    }


def presidio(url: str, checkpoint: str, texts: list[str]) -> dict:
    """Texts/s through BatchAnalyzerEngine: NerServeRecognizer against `url`, then TransformersNlpEngine."""
    import spacy
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from nerserve.presidio import NerServeRecognizer

    blank = Path(tempfile.mkdtemp(prefix="nerbench-spacy-"))
    spacy.blank("en").to_disk(blank)

    def analyzer(configuration: dict) -> AnalyzerEngine:
        engine = NlpEngineProvider(nlp_configuration=configuration).create_engine()
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.load_predefined_recognizers(nlp_engine=engine)
        return AnalyzerEngine(nlp_engine=engine, registry=registry)

    def timed(engine: AnalyzerEngine) -> tuple[dict, list]:
        batch = BatchAnalyzerEngine(engine)
        batch.analyze_iterator(texts[:64], language="en", batch_size=64)  # warm
        started = time.perf_counter()
        results = batch.analyze_iterator(texts, language="en", batch_size=64)
        elapsed = time.perf_counter() - started
        return {"texts": len(texts), "seconds": elapsed, "texts_s": len(texts) / elapsed}, results

    served = NerServeRecognizer(url).add_to(
        analyzer({"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": str(blank)}]})
    )
    ours, ours_results = timed(served)
    print(f"presidio + NerServeRecognizer: {ours['texts_s']:,.1f} texts/s", flush=True)
    in_process = analyzer(
        {
            "nlp_engine_name": "transformers",
            "models": [{"lang_code": "en", "model_name": {"spacy": str(blank), "transformers": checkpoint}}],
        }
    )
    theirs, theirs_results = timed(in_process)
    print(f"presidio + TransformersNlpEngine: {theirs['texts_s']:,.1f} texts/s", flush=True)

    def ner(results: list) -> set[tuple[int, str, int, int]]:
        return {
            (i, r.entity_type, r.start, r.end)
            for i, rs in enumerate(results)
            for r in rs
            if r.entity_type in NER_ENTITIES
        }

    a, b = ner(ours_results), ner(theirs_results)
    return {
        "nerserve_recognizer": ours,
        "transformers_nlp_engine": theirs,
        "ratio": ours["texts_s"] / theirs["texts_s"],
        "ner_results": {"nerserve": len(a), "transformers": len(b), "shared": len(a & b)},
    }


def table(results: dict) -> str:
    m = results["machine"]
    head = (
        f"machine: CPU {m['cpu']} x{m['cores']} | {results['date']} | {results['sentences']} CoNLL dev sentences, "
        f"{results['tokens']:,} tokens | model {results['model']}, ONNX Runtime, one worker"
    )
    r = results["routes"]
    lines = [
        head,
        "",
        "| measure | figure | ratio | target |",
        "| --- | ---: | ---: | --- |",
        f"| `POST /predict_tokens` closed loop (64 sentences/request, simple) | "
        f"{r['mean_tokens_s']['predict_tokens']:,.0f} tok/s | | |",
        f"| `POST /` (Hugging Face API), same requests | {r['mean_tokens_s']['hf']:,.0f} tok/s | "
        f"{r['hf_vs_predict_tokens']:.2f}x (median of paired rounds; of the means "
        f"{r['hf_vs_predict_tokens_of_means']:.2f}x) | >= 0.9x |",
    ]
    p = results["presidio"]
    lines += [
        f"| Presidio BatchAnalyzerEngine + NerServeRecognizer (local server) | "
        f"{p['nerserve_recognizer']['texts_s']:,.1f} texts/s | {p['ratio']:.2f}x | the figure |",
        f"| Presidio BatchAnalyzerEngine + TransformersNlpEngine (in process, same checkpoint) | "
        f"{p['transformers_nlp_engine']['texts_s']:,.1f} texts/s | | |",
        "",
        "paired round ratios (HF / predict_tokens, sorted): " + ", ".join(f"{x:.2f}" for x in r["paired_ratios"]),
        "rounds (tok/s, alternating): "
        + ", ".join(
            f"{name} " + " / ".join(f"{x['tokens_s']:,.0f}" for x in rounds) for name, rounds in r["rounds"].items()
        ),
        f"Presidio NER results (PERSON/LOCATION/ORGANIZATION): NerServeRecognizer {p['ner_results']['nerserve']}, "
        f"TransformersNlpEngine {p['ner_results']['transformers']}, the same (text, type, start, end) "
        f"{p['ner_results']['shared']}",
        "",
        "InferenceClient = pipeline, per strategy: "
        + "; ".join(
            f"{s} {e['texts']} texts, {e['items']} items {'equal' if e['equal'] else 'NOT EQUAL'} "
            f"(max score diff {e['max_score_diff']:.1e})"
            for s, e in results["equality"].items()
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--conll", type=Path, default=DEFAULT_CONLL)
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--equal", type=int, default=50, help="sentences compared with the pipeline")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per closed-loop round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="closed-loop rounds of each route, alternating")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    sentences = conll_sentences(args.conll)[0][: args.sentences]
    checkpoint = str(args.checkpoint)
    tokens = [len(ids) for ids in AutoTokenizer.from_pretrained(checkpoint)(sentences)["input_ids"]]
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "model": args.checkpoint.name,
        "sentences": len(sentences),
        "tokens": sum(tokens),
    }
    server = start([sys.executable, "-m", "nerserve", "serve"], server_env(checkpoint=checkpoint, engine="onnxruntime"))
    try:
        results["equality"] = equality(server.url, checkpoint, sentences[: args.equal])
        results["routes"] = routes(server.port, sentences, tokens, args.seconds, args.connections, args.rounds)
        results["presidio"] = presidio(server.url, checkpoint, sentences)
    finally:
        server.stop()
    cpu = results["machine"]["cpu"].replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{cpu}-hf-api.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text, f"\nwrote {out}", sep="\n")


if __name__ == "__main__":
    main()
