"""Correctness of the packed engine against float32, on CoNLL dev (sentences and 200-400-token paragraphs).

On CUDA: the default engine (packed, half precision, CUDA graphs) and padded fp16 against the HF
module in float32 (padded); token-label agreement, largest logit difference, grouped entities
("simple", "max") equal text by text, packed graph vs packed eager, and the pipeline (float32) on
the first 1000 sentences against our packed answers. On CPU: packed float32 against padded float32."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_batched(engine, seqs, max_num_tokens=16384):
    """Logits of every sequence, run in the token-budget batches the server would form (one batch
    of all of CoNLL dev would pad 3250 sentences to the longest and take tens of GB on CPU)."""
    out = [None] * len(seqs)
    lengths = np.array([len(s) for s in seqs])
    for batch in engine.batches(lengths, max_num_tokens):
        for i, x in zip(batch.tolist(), engine.logits([seqs[i] for i in batch.tolist()]), strict=True):
            out[i] = x
    return out


def _entities(items):
    return [(next(iter(e["results"])), e["start"], e["end"]) for e in items]


def check_packed(path: Path, texts: list[str], words=None, tags=None) -> dict:
    import torch
    from load import paragraphs

    from nerserve.checkpoint import load_checkpoint
    from nerserve.engines.torch_engine import TorchEngine
    from nerserve.text.aggregation import Aggregator
    from nerserve.text.tokenization import TextTokenizer

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    ck = load_checkpoint(str(path))
    tok = TextTokenizer(ck.tokenizer, ck.max_input_tokens, 128)
    agg = Aggregator(tok, ck.labels)
    sent_windows = tok.encode(texts, False)
    counts = np.array([sum(len(x.ids) for x in w) for w in sent_windows])
    paras = paragraphs(texts, counts)
    all_texts = texts + paras
    windows = sent_windows + tok.encode(paras, False)
    seqs = [x.ids for w in windows for x in w]
    ref_engine = TorchEngine(ck, device="cuda" if cuda else "cpu", precision="fp32", packed=False)
    ref = run_batched(ref_engine, seqs)
    ref_engine.close()
    engines = {"packed": TorchEngine(ck) if cuda else TorchEngine(ck, device="cpu", packed=True)}
    if cuda:
        engines["packed_eager"] = TorchEngine(ck, graphs=False)
        engines["padded_fp16"] = TorchEngine(ck, precision="fp16", packed=False)
    ref_labels = np.concatenate([x.argmax(-1) for x in ref])
    report = {
        "checkpoint": str(path),
        "texts": len(all_texts),
        "sentences": len(texts),
        "paragraphs": len(paras),
        "tokens": int(ref_labels.size),
    }
    outputs = {}
    for name, engine in engines.items():
        out = run_batched(engine, seqs)
        outputs[name] = out
        labels = np.concatenate([x.argmax(-1) for x in out])
        entry = {
            "engine": f"{engine.precision} {'packed' if not engine.padded else 'padded'}"
            f"{' graphs' if getattr(engine, '_graphs', None) else ''}",
            "token_label_agreement": float((labels == ref_labels).mean()),
            "tokens_differing": int((labels != ref_labels).sum()),
            "max_abs_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(out, ref, strict=True))),
        }
        for strategy in ("simple", "max"):
            differ, cursor = 0, 0
            for text, w in zip(all_texts, windows, strict=True):
                a = agg.grouped([text], [w], out[cursor : cursor + len(w)], strategy)[0]
                b = agg.grouped([text], [w], ref[cursor : cursor + len(w)], strategy)[0]
                cursor += len(w)
                differ += _entities(a) != _entities(b)
            entry[f"texts_with_different_entities_{strategy}"] = differ
        report[name] = entry
    if "packed_eager" in outputs:
        report["graph_vs_eager_max_abs_diff"] = float(
            max(np.abs(a - b).max() for a, b in zip(outputs["packed"], outputs["packed_eager"], strict=True))
        )
    for engine in engines.values():
        engine.close()
    if cuda:  # the oracle itself, float32 on the GPU, vs our packed fp16 answers
        from transformers import pipeline

        pipe = pipeline("token-classification", model=str(path), aggregation_strategy="simple", device=0)
        subset = texts[:1000]
        theirs = pipe(subset, batch_size=64)
        differ, cursor = 0, 0
        out = outputs["packed"]
        for text, w, t in zip(subset, sent_windows, theirs, strict=True):
            ours = agg.grouped([text], [w], out[cursor : cursor + len(w)], "simple")[0]
            cursor += len(w)
            differ += _entities(ours) != [(e["entity_group"], e["start"], e["end"]) for e in t]
        report["pipeline_fp32_vs_packed_simple"] = {"texts": len(subset), "texts_differing": differ}
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
