"""Entity F1 of an ONNX graph on CoNLL-2003 (each word labelled by its first sub-token, entities scored by
the evaluator, evaluation/): how the build judges an int8 graph against float32 on real text
(export/build.py). The graph runs here, without the server's scheduler (the build has no service), but
the words' tags are read and scored by the same functions as `nerserve eval --aggregation-strategy none`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..engines.ort_engine import OnnxRuntimeEngine
from ..evaluation.gold import joined
from ..evaluation.scheme import tags_from_token_labels
from ..evaluation.scores import micro_f1


def predict_word_tags(
    engine, checkpoint: Checkpoint, sentences: list[list[str]], batch_size: int = 64
) -> list[list[str]]:
    """Each word's tag: the label of its first sub-token (words cut off by truncation get O), read by
    the evaluator as `nerserve eval --aggregation-strategy none` reads an answer, so the build's F1 is
    that command's on the same graph. Sentences are sent as their words joined by single spaces,
    batched by length."""
    texts, words = zip(*(joined(sentence) for sentence in sentences), strict=True) if sentences else ((), ())
    encoded = checkpoint.tokenizer(
        list(texts), return_offsets_mapping=True, truncation=True, max_length=checkpoint.max_input_tokens
    )
    order = sorted(range(len(sentences)), key=lambda i: len(encoded["input_ids"][i]))
    predictions: list[list[str]] = [[] for _ in sentences]
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        logits = engine.logits([np.asarray(encoded["input_ids"][i], dtype=np.int64) for i in chunk])
        for i, sentence_logits in zip(chunk, logits, strict=True):
            labels = sentence_logits.argmax(axis=-1)
            items = (
                (start, end, checkpoint.labels[int(label)])
                for (start, end), label in zip(encoded["offset_mapping"][i], labels, strict=True)
            )
            predictions[i] = tags_from_token_labels(words[i], items)
    return predictions


def conll_f1(onnx_path: Path, checkpoint: Checkpoint, data: list[tuple[list[str], list[str]]], precision: str) -> float:
    """Entity F1 of ONNX Runtime serving `onnx_path` on `data`."""
    engine = OnnxRuntimeEngine(onnx_path, checkpoint.pad_id, precision=precision)
    predicted = predict_word_tags(engine, checkpoint, [words for words, _ in data])
    return micro_f1([tags for _, tags in data], predicted)
