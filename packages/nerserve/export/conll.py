"""Entity F1 on CoNLL-2003 (first sub-token per word, exact span match): how the build judges an int8
graph against float32 on real text (export/build.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..engines.ort_engine import OnnxRuntimeEngine


def read_conll(path: Path, limit: int | None = None) -> list[tuple[list[str], list[str]]]:
    """(words, NER tags) per sentence of a CoNLL-2003 file (4 columns, blank-line separated, -DOCSTART- skipped)."""
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for line in path.read_text().splitlines() + [""]:
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        columns = line.split()
        words.append(columns[0])
        tags.append(columns[-1])
    return sentences[:limit] if limit is not None else sentences


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) entities of a tag sequence, read as conlleval reads it.

    An entity starts at B-X, or at I-X after O or after another type: that reads IOB1 (the CoNLL
    gold, where B- only separates two adjacent entities of one type) and IOB2 (what the model emits)
    alike, so both sides are compared as entities, never tag by tag."""
    spans: set[tuple[int, int, str]] = set()
    start, kind = None, ""
    for index, tag in enumerate(tags + ["O"]):
        prefix, _, label = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and label != kind)
        if start is not None and (prefix == "O" or begins):
            spans.add((start, index, kind))
            start, kind = None, ""
        if begins:
            start, kind = index, label
    return spans


def predict_word_tags(
    engine, checkpoint: Checkpoint, sentences: list[list[str]], batch_size: int = 64
) -> list[list[str]]:
    """The label of each word's first sub-token (words cut off by truncation get O), batched by length."""
    encoded = checkpoint.tokenizer(
        sentences, is_split_into_words=True, truncation=True, max_length=checkpoint.max_input_tokens
    )
    order = sorted(range(len(sentences)), key=lambda i: len(encoded["input_ids"][i]))
    predictions: list[list[str]] = [[] for _ in sentences]
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        logits = engine.logits([np.asarray(encoded["input_ids"][i], dtype=np.int64) for i in chunk])
        for i, sentence_logits in zip(chunk, logits, strict=True):
            tags = ["O"] * len(sentences[i])
            seen: set[int] = set()
            for position, word in enumerate(encoded.word_ids(i)):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags[word] = checkpoint.labels[int(sentence_logits[position].argmax())]
            predictions[i] = tags
    return predictions


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Micro entity F1 over all sentences: exact (start, end, type) matches."""
    hits = found = wanted = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        want, got = entity_spans(gold_tags), entity_spans(predicted_tags)
        hits += len(want & got)
        found += len(got)
        wanted += len(want)
    precision = hits / found if found else 0.0
    recall = hits / wanted if wanted else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def conll_f1(onnx_path: Path, checkpoint: Checkpoint, data: list[tuple[list[str], list[str]]], precision: str) -> float:
    """Entity F1 of ONNX Runtime serving `onnx_path` on `data`."""
    engine = OnnxRuntimeEngine(onnx_path, checkpoint.pad_id, precision=precision)
    predicted = predict_word_tags(engine, checkpoint, [words for words, _ in data])
    return entity_f1([tags for _, tags in data], predicted)
