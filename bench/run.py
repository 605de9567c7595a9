"""`make bench`: the pipeline vs our engine, host path and HTTP server, measured in one run.

For each checkpoint (the shared MiniLM-L6 CoNLL model, and a BERT-base-shaped token classifier with
random weights built on the spot), on the machine this runs on:
- pipeline b1 / b64: transformers' token-classification pipeline (aggregation "simple"), one
  sentence per call / lists with batch_size=64 (float32: the pipeline is Python-bound, fp16 is slower);
  and the HTTP bench's paragraph requests (8 per call, batch_size=8), which the paragraph row is
  also compared with;
- engine: the engine `engine: auto` picks (ONNX Runtime on CPU, packed PyTorch on CUDA) on
  pre-tokenized CoNLL dev sentences in token-budget batches (its default budget), logits to host;
- host: tokenization + aggregation ("simple") + orjson encoding, without the engine (scores precomputed);
- http: `python -m nerserve serve` (its default processes) over localhost HTTP, a closed-loop client
  keeping `--connections` requests in flight (bench/load.py), requests of 64 sentences or 8 paragraphs
  (200-400 tokens, joined sentences); single-sentence latency from sequential one-sentence requests.
Tokens are model tokens with [CLS]/[SEP]. Ratios are to the pipeline's b64 tokens/s (b1 for latency).
Prints a table and writes JSON to bench/results/<date>-<machine>.json (or --out). bench/host.py adds the
rows of the server's processes (host capacity by worker count, the single-process baseline, mixed load).

`--check` (GPU) first proves the packed half-precision engine against float32 on CoNLL dev."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "packages"), str(ROOT / "bench")]
import httpx  # noqa: E402
import load  # noqa: E402 - bench/load.py, on the path above
import orjson  # noqa: E402
from load import paragraphs, requests_of  # noqa: E402

from check_packed import check_packed, run_batched  # noqa: E402 - needs the path above
from nerserve.evaluation.gold import read_conll  # noqa: E402
from nerserve.scores import TokenScores  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "minilm-l6-conll03-ner"
DEFAULT_CONLL = SHARED / "data" / "conll2003" / "eng.testa"


# ---- data ------------------------------------------------------------------------------------------


def conll_sentences(path: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Dev sentences as text (words joined by spaces), with their words and gold tags."""
    sentences = read_conll(path)
    return [" ".join(words) for words, _ in sentences], [w for w, _ in sentences], [t for _, t in sentences]


def machine_name() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_bert_base(tokenizer_dir: Path, out: Path) -> Path:
    """BERT-base-shaped BertForTokenClassification with random weights and the shared tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForTokenClassification

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    src = AutoConfig.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=len(src.id2label),
        id2label=src.id2label,
        label2id=src.label2id,
    )
    torch.manual_seed(0)
    BertForTokenClassification(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- timing helpers ---------------------------------------------------------------------------------


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def timed_loop(fn, items, seconds: float, min_iters: int = 3):
    """Call fn(item) cycling over items until `seconds` pass; (calls, elapsed, latencies)."""
    lat, i, start = [], 0, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn(items[i % len(items)])
        lat.append(time.perf_counter() - t0)
        i += 1
        if time.perf_counter() - start >= seconds and i >= min_iters:
            break
    return i, time.perf_counter() - start, lat


# ---- measurements -------------------------------------------------------------------------------------


def _pipeline_throughput(pipe, chunks: list[list[str]], batch_size: int, ntok: dict, seconds: float) -> dict:
    """Texts and tokens per second of the pipeline called on `chunks` in turn with `batch_size`."""
    pipe(chunks[0][:batch_size], batch_size=batch_size)
    texts = tokens = 0
    start = time.perf_counter()
    for k in range(10**6):
        chunk = chunks[k % len(chunks)]
        pipe(chunk, batch_size=batch_size)
        texts += len(chunk)
        tokens += sum(ntok[s] for s in chunk)
        if time.perf_counter() - start >= seconds:
            break
    el = time.perf_counter() - start
    return {"texts_s": texts / el, "tokens_s": tokens / el}


def bench_pipeline(path: Path, sents: list[str], paras: list[str], ntok: dict, seconds: float, device: str) -> dict:
    from transformers import pipeline

    pipe = pipeline(
        "token-classification", model=str(path), aggregation_strategy="simple", device=0 if device == "cuda" else -1
    )
    pipe(sents[:8])
    pipe(sents[0])
    n, el, lat = timed_loop(pipe, sents, seconds)
    b1 = {
        "texts_s": n / el,
        "tokens_s": sum(ntok[s] for s in (sents * (n // len(sents) + 1))[:n]) / el,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }
    b64 = _pipeline_throughput(pipe, [sents[i : i + 256] for i in range(0, len(sents), 256)], 64, ntok, seconds)
    # the same requests of 8 paragraphs the HTTP bench sends, so paragraphs compare like with like
    p8 = _pipeline_throughput(pipe, requests_of(paras, 8), 8, ntok, seconds)
    del pipe
    return {"pipeline_b1": b1, "pipeline_b64": b64, "pipeline_paragraphs": p8}


def bench_engine(engine, seqs: list[np.ndarray], seconds: float, max_num_tokens: int) -> dict:
    lengths = np.array([len(s) for s in seqs])
    batches = [[seqs[i] for i in b] for b in engine.batches(lengths, max_num_tokens)]
    for b in batches[:3]:
        engine.logits(b)
    tokens = texts = 0
    start = time.perf_counter()
    for k in range(10**7):
        b = batches[k % len(batches)]
        engine.logits(b)
        tokens += sum(len(s) for s in b)
        texts += len(b)
        if time.perf_counter() - start >= seconds and k >= len(batches) - 1:
            break
    el = time.perf_counter() - start
    n, el1, lat = timed_loop(lambda s: engine.logits([s]), seqs[:512], min(seconds, 3.0), 20)
    return {
        "texts_s": texts / el,
        "tokens_s": tokens / el,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "batches": len(batches),
    }


def bench_host(service, sents: list[str], scores_of: dict, seconds: float) -> dict:
    """A worker's work on 64 texts per request, without the engine: validation, tokenization,
    aggregation of the engine's scores (recorded before), JSON encoding."""
    from nerserve.schemas import parse_request
    from nerserve.scores import TokenScores

    def step(chunk):
        prepared = service.frontend.prepare(parse_request({"inputs": chunk, "aggregation_strategy": "simple"}, 1024))
        parts = [scores_of[t] for t in chunk]
        scores = TokenScores(np.concatenate([p.labels for p in parts]), np.concatenate([p.probs for p in parts]), None)
        orjson.dumps(service.frontend.answer(prepared, scores))
        return prepared.tokens

    chunks = [sents[i : i + 64] for i in range(0, len(sents), 64)]
    step(chunks[0])
    tokens = texts = 0
    start = time.perf_counter()
    for k in range(10**7):
        tokens += step(chunks[k % len(chunks)])
        texts += len(chunks[k % len(chunks)])
        if time.perf_counter() - start >= seconds:
            break
    el = time.perf_counter() - start
    return {"texts_s": texts / el, "tokens_s": tokens / el}


def bench_http(
    path: Path,
    sents: list[str],
    paras: list[str],
    ntok: dict,
    seconds: float,
    connections: int,
    engine: str,
    engine_dir: Path | None = None,
) -> dict:
    """`python -m nerserve serve` (its default workers) under closed-loop load: 64-sentence and 8-paragraph
    requests, then one sentence at a time (server-side time from x-total-time-ms)."""
    settings = {"checkpoint": str(path), "engine": engine, **({"engine_dir": str(engine_dir)} if engine_dir else {})}
    server = load.start([sys.executable, "-m", "nerserve", "serve"], load.server_env(**settings))
    try:
        info = httpx.get(server.url + "/info").json()

        res = {
            "engine": info.get("engine"),
            "precision": info.get("precision"),
            "max_num_tokens": info.get("max_num_tokens"),
        }
        for name, texts, per in (("sentences", sents, 64), ("paragraphs", paras, 8)):
            result = load.closed_loop(
                server.port, load.predict_requests(requests_of(texts, per), ntok.__getitem__), connections, seconds
            )
            res[name] = {
                "tokens_s": result["tokens_s"],
                "texts_s": result["requests_s"] * per,
                "req_p50_ms": result["p50_ms"],
                "req_p99_ms": result["p99_ms"],
                "clients": f"{connections} connections",
                "statuses": result["statuses"],
            }
        with httpx.Client(base_url=server.url, timeout=60) as client:
            one = [orjson.dumps({"inputs": [s], "aggregation_strategy": "simple"}) for s in sents[:500]]
            for b in one[:20]:
                client.post("/predict_tokens", content=b, headers={"content-type": "application/json"})
            server_ms: list[float] = []  # the server's own x-total-time-ms: no client or loopback time

            def one_call(body):
                response = client.post("/predict_tokens", content=body, headers={"content-type": "application/json"})
                server_ms.append(float(response.headers["x-total-time-ms"]))

            n, el, lat = timed_loop(one_call, one, min(seconds, 5.0), 50)
        res["single"] = {
            "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "texts_s": n / el,
            "server_p50_ms": pct(server_ms, 50),
            "server_p99_ms": pct(server_ms, 99),
        }
        return res
    finally:
        server.stop()


# ---- per model ----------------------------------------------------------------------------------------


def build_int8(path: Path, out: Path) -> Path:
    """`make build-engine PRECISION=int8` for the CPU row: quantized graph, F1 measured by the build."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nerserve",
            "build-engine",
            "--checkpoint",
            str(path),
            "--precision",
            "int8",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
    )
    return out


def bench_model(label: str, path: Path, sents: list[str], args, device: str, engine_dir: Path | None = None) -> dict:
    from nerserve.config import Settings
    from nerserve.service import InProcessService

    print(f"[{label}] loading service ({path}{', engine dir ' + str(engine_dir) if engine_dir else ''})", flush=True)
    service = InProcessService(
        Settings(checkpoint=str(path), engine=args.engine, engine_dir=str(engine_dir) if engine_dir else None)
    )
    tok = service.core.tokenizer
    windows = tok.encode(sents, False)
    ntok = {t: sum(len(x.ids) for x in w) for t, w in zip(sents, windows, strict=True)}
    counts = np.array([ntok[t] for t in sents])
    paras = paragraphs(sents, counts)
    pw = tok.encode(paras, False)
    ntok.update({t: sum(len(x.ids) for x in w) for t, w in zip(paras, pw, strict=True)})
    seqs = [x.ids for w in windows for x in w]
    res = {
        "checkpoint": str(path),
        "engine": service.core.engine.name,
        "precision": service.core.engine.precision,
        "packed": not service.core.engine.padded,
        "sentences": len(sents),
        "mean_sentence_tokens": float(counts.mean()),
        "paragraphs": len(paras),
        "mean_paragraph_tokens": float(np.mean([ntok[p] for p in paras])),
    }
    if engine_dir:  # the build measured entity F1 on CoNLL dev for both precisions
        graph = json.loads((engine_dir / "manifest.json").read_text())["parity"]["int8"]
        res["conll_f1"] = {k: graph[k] for k in ("f1_fp32", "f1_int8", "f1_sentences") if k in graph}
    print(f"[{label}] engine {res['engine']} {res['precision']} packed={res['packed']}", flush=True)
    budget = args.max_num_tokens or service.core.engine.max_num_tokens
    res["engine_alone"] = bench_engine(service.core.engine, seqs, args.seconds, budget)
    print(f"[{label}] engine alone: {res['engine_alone']}", flush=True)
    logits = run_batched(service.core.engine, seqs, budget)
    cursor, scores_of = 0, {}
    for t, w in zip(sents, windows, strict=True):
        scores_of[t] = TokenScores.of_logits(np.concatenate(logits[cursor : cursor + len(w)]), keep_logits=False)
        cursor += len(w)
    res["host"] = bench_host(service, sents, scores_of, args.seconds)
    print(f"[{label}] host path: {res['host']}", flush=True)
    service.close()
    del service
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    res.update(bench_pipeline(path, sents, paras, ntok, args.seconds, device))
    print(f"[{label}] pipeline: b1 {res['pipeline_b1']} b64 {res['pipeline_b64']}", flush=True)
    if not args.no_http:
        try:
            res["http"] = bench_http(path, sents, paras, ntok, args.seconds, args.connections, args.engine, engine_dir)
            print(f"[{label}] http: {res['http']}", flush=True)
        except Exception as error:  # report, keep the other figures
            res["http_error"] = f"{type(error).__name__}: {error}"
            print(f"[{label}] http failed: {res['http_error']}", flush=True)
    return res


def table(results: dict) -> str:
    m = results["machine"]
    head = (
        f"machine: {m.get('gpu') or 'no GPU'} | CPU {m['cpu']} x{m['cores']} | torch {m['torch']} | "
        f"transformers {m['transformers']} | {results['date']}"
    )
    lines = [
        head,
        "| model | path | tokens/s | texts/s | x pipeline b64 | single p50 ms | single p99 ms | x pipeline b1 p50 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in results["models"].items():
        base = r["pipeline_b64"]["tokens_s"]
        p1 = r["pipeline_b1"]["p50_ms"]

        def row(name, d, single=None, label=label, base=base, p1=p1):
            single = single or {}
            lat, p99 = single.get("p50_ms"), single.get("p99_ms")
            lines.append(
                f"| {label} | {name} | {d['tokens_s']:,.0f} | {d['texts_s']:,.1f} | "
                f"{d['tokens_s'] / base:.2f} | {'' if lat is None else f'{lat:.2f}'} | "
                f"{'' if p99 is None else f'{p99:.2f}'} | "
                f"{'' if lat is None else f'{p1 / lat:.2f}'} |"
            )

        row("pipeline b1 (fp32)", r["pipeline_b1"], r["pipeline_b1"])
        row("pipeline b64 (fp32)", r["pipeline_b64"])
        if "pipeline_paragraphs" in r:
            row("pipeline paragraphs, 8/call (fp32)", r["pipeline_paragraphs"])
        eng = f"engine alone ({r['engine']} {r['precision']}{' packed' if r['packed'] else ''})"
        row(eng, r["engine_alone"], r["engine_alone"])
        row("host path alone (tokenize+aggregate+json)", r["host"])
        if "http" in r:
            h = r["http"]
            row(f"HTTP sentences, 64/request, clients {h['sentences']['clients']}", h["sentences"], h["single"])
            like = (
                f"; {h['paragraphs']['tokens_s'] / r['pipeline_paragraphs']['tokens_s']:.2f}x pipeline paragraphs"
                if "pipeline_paragraphs" in r
                else ""
            )
            row(f"HTTP paragraphs ({r['mean_paragraph_tokens']:.0f} tok), 8/request{like}", h["paragraphs"])
            s = h["single"]
            lines.append(
                f"| {label} | one sentence, server-side (x-total-time-ms) | | | | "
                f"{s['server_p50_ms']:.2f} | {s['server_p99_ms']:.2f} | |"
            )
        elif "http_error" in r:
            lines.append(f"| {label} | HTTP | failed: {r['http_error'][:120]} | | | | | |")
        else:
            lines.append(f"| {label} | HTTP | not measured on this machine (--no-http) | | | | | |")
    for label, r in results["models"].items():
        if "conll_f1" in r:
            f1 = r["conll_f1"]
            lines.append(
                f"\n{label}: entity F1 on CoNLL-2003 dev ({f1.get('f1_sentences')} sentences): "
                f"fp32 {f1.get('f1_fp32', float('nan')):.4f}, int8 {f1.get('f1_int8', float('nan')):.4f}"
            )
    if "check" in results:
        lines.append("")
        lines.append("correctness (packed engine vs float32): " + json.dumps(results["check"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 1000 sentences")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument(
        "--models",
        default=None,
        help="comma list of minilm, bert-base, minilm-int8 (default: minilm,bert-base, plus minilm-int8 on CPU)",
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--conll", type=Path, default=DEFAULT_CONLL)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--max-num-tokens", type=int, default=None, help="engine batch budget (default: its own)")
    parser.add_argument("--sentences", type=int, default=None, help="dev sentences used (default all)")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--connections", type=int, default=None, help="HTTP requests in flight (default 16; 64 on GPU)")
    parser.add_argument("--check", action="store_true", help="packed-engine correctness first (CUDA)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the BERT-base checkpoint is built")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.connections = args.connections or (64 if device == "cuda" else 16)
    texts, words, tags = conll_sentences(args.conll)
    n = args.sentences or (1000 if args.quick else len(texts))
    sents = texts[:n]
    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "device": device,
        "seconds_per_measure": args.seconds,
        "models": {},
    }
    print(json.dumps(results["machine"]), flush=True)
    if args.check:
        try:
            results["check"] = check_packed(args.checkpoint, texts, words, tags)
        except Exception as error:  # report it, still run the bench
            import traceback

            traceback.print_exc()
            results["check"] = {"error": f"{type(error).__name__}: {error}"}
        print("check:", json.dumps(results["check"]), flush=True)
    tag = (results["machine"].get("gpu") or results["machine"]["cpu"]).replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nerbench-"))
    models = args.models or ("minilm,bert-base" if device == "cuda" else "minilm,minilm-int8,bert-base")
    for label in models.split(","):
        path = (
            build_bert_base(args.checkpoint, workdir / "bert-base-random") if label == "bert-base" else args.checkpoint
        )
        engine_dir = build_int8(path, workdir / "int8") if label == "minilm-int8" else None
        results["models"][label] = bench_model(label, path, sents, args, device, engine_dir)
        out.write_text(json.dumps(results, indent=1))  # partial results survive a later failure
    text = table(results)
    print("\n" + text, flush=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
