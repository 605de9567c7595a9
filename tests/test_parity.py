"""Differential tests: our answers against `transformers.pipeline("token-classification")`, the oracle.

320 texts (tests/corpus.py: accents composed and decomposed, CJK, emoji and other astral characters,
punctuation runs, abbreviations, currency, tabs/newlines, edge spaces, the empty string, texts far
over 512 tokens), every strategy, three built checkpoints (WordPiece uncased and cased, byte-level
BPE), both CPU engines, and the shared real checkpoint. Spans and labels must be equal; scores
within 1e-4 (PyTorch) or 1e-3 (ONNX Runtime)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from transformers import AutoModelForTokenClassification, AutoTokenizer, TokenClassificationPipeline, pipeline

import corpus
from conftest import real_checkpoint, record
from nerserve.config import Settings
from nerserve.schemas import parse_request
from nerserve.service import InProcessService

TEXTS = corpus.texts()
GROUPED = ("simple", "first", "average", "max")
TOLERANCE = {"torch": 1e-4, "onnxruntime": 1e-3}


@functools.cache
def service(path: str, engine: str) -> InProcessService:
    return InProcessService(Settings(checkpoint=path, engine=engine))


@functools.cache
def _pipeline_forwards(
    path: str, truncation_side: str, stride: int | None, texts: tuple[str, ...]
) -> tuple[TokenClassificationPipeline, list[list[dict]]]:
    """The pipeline and its model outputs for each text's chunks, as its own `run_single` makes them
    (preprocess, then forward per chunk): what every strategy's postprocess then reads."""
    tokenizer = AutoTokenizer.from_pretrained(path, truncation_side=truncation_side)
    chunking = {"stride": stride, "aggregation_strategy": "simple"} if stride is not None else {}
    classifier = pipeline("token-classification", model=path, tokenizer=tokenizer, **chunking)
    preprocess, forward, _ = classifier._sanitize_parameters(**chunking)
    outputs = [
        [classifier.forward(chunk, **forward) for chunk in classifier.preprocess(text, **preprocess)] for text in texts
    ]
    return classifier, outputs


@functools.cache
def oracle(
    path: str,
    strategy: str,
    truncation_side: str = "right",
    stride: int | None = None,
    texts: tuple[str, ...] = tuple(TEXTS),
) -> list[list[dict]]:
    """The pipeline's answers: its postprocess under `strategy` over its own model outputs, which are
    computed once for every strategy (cached, as several engines compare against the same answers)."""
    classifier, outputs = _pipeline_forwards(path, truncation_side, stride, texts)
    extra = {"ignore_labels": []} if strategy == "none" else {}
    _, _, postprocess = classifier._sanitize_parameters(aggregation_strategy=strategy, **extra)
    return [list(classifier.postprocess(chunks, **postprocess)) for chunks in outputs]


def ours(path: str, engine: str, texts: list[str], **request) -> list[list[dict]]:
    return service(path, engine).predict(parse_request({"inputs": texts, **request}, max_texts=10_000))


def compare(want: list[list[dict]], got: list[list[dict]], texts: list[str], tolerance: float) -> tuple[int, float]:
    """Assert equal spans and labels and close scores; return (items compared, largest score difference)."""
    items, worst = 0, 0.0
    for text, expected, answered in zip(texts, want, got, strict=True):
        label = "entity_group" if expected and "entity_group" in expected[0] else "entity"
        expected_spans = [(e["start"], e["end"], e[label]) for e in expected]
        answered_spans = [(a["start"], a["end"], next(iter(a["results"]))) for a in answered]
        assert answered_spans == expected_spans, f"text {text[:60]!r}"
        for e, a in zip(expected, answered, strict=True):
            assert a["token"] == text[a["start"] : a["end"]]
            worst = max(worst, abs(float(e["score"]) - next(iter(a["results"].values()))))
        items += len(expected)
    assert worst <= tolerance, f"largest score difference {worst:.2e} > {tolerance}"
    return items, worst


def content_tokens(answers: list[list[dict]], path: str) -> list[list[dict]]:
    """Our `none` answers without the special tokens (the pipeline drops them)."""
    special = set(AutoTokenizer.from_pretrained(path).all_special_ids)
    return [[t for t in answer if not (t["token_id"] in special and t["start"] == t["end"])] for answer in answers]


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
@pytest.mark.parametrize("kind", ["wordpiece-uncased", "wordpiece-cased", "bpe"])
def test_grouped_strategies_equal_pipeline(built, kind: str, engine: str) -> None:
    path = str(built(kind))
    for strategy in GROUPED:
        got = ours(path, engine, TEXTS, aggregation_strategy=strategy, truncate=True)
        items, worst = compare(oracle(path, strategy), got, TEXTS, TOLERANCE[engine])
        assert items > 500, "the checkpoint should produce many entities"
        record(
            f"{kind:18} {engine:12} {strategy:8} {len(TEXTS)} texts, {items} entities equal, max score diff {worst:.1e}"
        )


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
@pytest.mark.parametrize("kind", ["wordpiece-uncased", "wordpiece-cased", "bpe"])
def test_none_equals_pipeline_plus_special_tokens(built, kind: str, engine: str) -> None:
    path = str(built(kind))
    got = ours(path, engine, TEXTS, aggregation_strategy="none", truncate=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text, answer in zip(TEXTS, got, strict=True):
        expected_ids = tokenizer(text, truncation=True)["input_ids"]
        assert [t["token_id"] for t in answer] == expected_ids
        assert answer[0]["token"] == tokenizer.convert_ids_to_tokens(expected_ids[0])  # [CLS] / <s>
    items, worst = compare(oracle(path, "none"), content_tokens(got, path), TEXTS, TOLERANCE[engine])
    record(f"{kind:18} {engine:12} none     {len(TEXTS)} texts, {items} tokens equal, max score diff {worst:.1e}")


def test_raw_scores_are_the_models_logits(built) -> None:
    path = str(built("wordpiece-cased"))
    texts = TEXTS[:40]
    got = ours(path, "torch", texts, aggregation_strategy="none", raw_scores=True, truncate=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for text, answer in zip(texts, got, strict=True):
        logits = model(**tokenizer(text, truncation=True, return_tensors="pt")).logits[0].detach().numpy()
        for row, item in zip(logits, answer, strict=True):
            top = int(row.argmax())
            assert list(item["results"]) == [labels[top]] + [name for i, name in enumerate(labels) if i != top]
            assert np.allclose([item["results"][name] for name in labels], row, atol=1e-4)


@pytest.mark.parametrize("kind", ["wordpiece-uncased", "bpe"])
def test_left_truncation_equals_pipeline(built, kind: str) -> None:
    path = str(built(kind))
    long_texts = [t for t in TEXTS if len(t) > 2000] + TEXTS[:10]
    for strategy in ("simple", "max"):
        got = ours(
            path, "onnxruntime", long_texts, aggregation_strategy=strategy, truncate=True, truncation_direction="LEFT"
        )
        want = oracle(path, strategy, truncation_side="left", texts=tuple(long_texts))
        items, worst = compare(want, got, long_texts, TOLERANCE["onnxruntime"])
        record(f"{kind:18} onnxruntime  {strategy:8} truncate Left: {len(long_texts)} texts, {items} entities equal")


@pytest.mark.parametrize("kind", ["wordpiece-uncased", "bpe"])
def test_overlong_texts_equal_pipeline_with_stride(built, kind: str) -> None:
    path = str(built(kind))
    long_texts = [t for t in TEXTS if len(t) > 2000] + TEXTS[:5]
    svc = service(path, "onnxruntime")
    for strategy in GROUPED:
        got = ours(path, "onnxruntime", long_texts, aggregation_strategy=strategy, truncate=False)
        want = oracle(path, strategy, stride=svc.core.tokenizer.window_stride, texts=tuple(long_texts))
        items, worst = compare(want, got, long_texts, TOLERANCE["onnxruntime"])
        # whole text read: entities beyond the first window exist
        assert max(a["end"] for a in got[0]) > max(a["end"] for a in oracle(path, strategy, texts=tuple(long_texts))[0])
        record(
            f"{kind:18} onnxruntime  {strategy:8} windows (stride {svc.core.tokenizer.window_stride}): "
            f"{len(long_texts)} texts, {items} entities equal, max score diff {worst:.1e}"
        )


def test_overlong_none_reads_every_token_once_from_its_most_central_window(built) -> None:
    """Independent oracle: HF's own overflow windows and the PyTorch model, token by token."""
    path = str(built("wordpiece-cased"))
    text = next(t for t in TEXTS if len(t) > 6000)
    svc = service(path, "torch")
    got = ours(path, "torch", [text], aggregation_strategy="none", truncate=False)[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = tokenizer(text, truncation=False, return_offsets_mapping=True)
    assert [t["token_id"] for t in got] == full["input_ids"]
    assert [(t["start"], t["end"]) for t in got] == [tuple(o) for o in full["offset_mapping"]]
    stride = svc.core.tokenizer.window_stride
    windows = tokenizer(
        text, truncation=True, stride=stride, return_overflowing_tokens=True, padding=True, return_tensors="pt"
    )
    windows.pop("overflow_to_sample_mapping", None)
    model = AutoModelForTokenClassification.from_pretrained(path).eval()
    probs = model(**windows).logits.softmax(-1).detach().numpy()
    content = int(windows["attention_mask"][0].sum()) - 2
    step = content - stride
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for position, item in enumerate(got[1:-1]):
        candidates = [
            (min(position - k * step, k * step + content - 1 - position), -k)
            for k in range(len(probs))
            if 0 <= position - k * step < content
        ]
        window = -max(candidates)[1]
        row = probs[window, 1 + position - window * step]
        assert item["results"] == pytest.approx({labels[int(row.argmax())]: float(row.max())}, abs=1e-4)
    assert len(probs) >= 4, "the text should need several windows"


def ours_for_each_strategy(path: str, engine: str, texts: list[str]) -> dict[str, list[list[dict]]]:
    """Our answers under every strategy from one engine run: the texts tokenized and scored once (with
    logits, as `average` needs them), then aggregated five ways. The engine's scores are the same
    whichever request asked for them; the request path itself is what the other tests run."""
    svc = service(path, engine)
    request = parse_request({"inputs": texts, "aggregation_strategy": "average", "truncate": True}, 10_000)
    prepared = svc.frontend.prepare(request)
    scores = svc.core.score(prepared.sequences, prepared.keep_logits).result()
    answers = {}
    for strategy in ("none", *GROUPED):
        asked = dataclasses.replace(prepared, request=request.model_copy(update={"aggregation_strategy": strategy}))
        answers[strategy] = svc.frontend.answer(asked, scores)
    return answers


def test_shared_real_checkpoint_equals_pipeline() -> None:
    path = str(real_checkpoint())
    answers = ours_for_each_strategy(path, "onnxruntime", TEXTS)
    for strategy in ("none",) + GROUPED:
        got = answers[strategy]
        if strategy == "none":
            got = content_tokens(got, path)
        items, worst = compare(oracle(path, strategy), got, TEXTS, TOLERANCE["onnxruntime"])
        record(
            f"{'minilm-l6-conll03':18} onnxruntime  {strategy:8} {len(TEXTS)} texts, {items} items equal, "
            f"max score diff {worst:.1e}"
        )
    seed = ours(
        path,
        "onnxruntime",
        ["Apple is looking at buying U.K. startup for $1 billion"],
        aggregation_strategy="max",
        truncate=True,
    )[0]
    # The pipeline's answer (checked equal above): "." tokens are O, so U.K. comes out as two LOC entities.
    assert [(e["token"], next(iter(e["results"]))) for e in seed] == [("Apple", "ORG"), ("U", "LOC"), ("K", "LOC")]


def test_128_position_checkpoint_serves_every_strategy_with_defaults(tmp_path) -> None:
    """Many small NER checkpoints have a 128-token window: with every default (no truncation, the window
    overlap chosen to fit: 63) over-long texts are read whole, and each strategy equals the pipeline
    (grouped ones run with the same stride; `none` on the texts that fit, and every token once on the rest)."""
    import checkpoints

    path = str(checkpoints.build("wordpiece-uncased", tmp_path / "w128", max_length=128))
    svc = InProcessService(Settings(checkpoint=path, engine="onnxruntime"))
    assert svc.core.tokenizer.window_stride == 63 and svc.info()["window_stride"] == 63
    tokenizer = AutoTokenizer.from_pretrained(path)
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    texts = [t for t, n in zip(TEXTS, lengths, strict=True) if n > 128] + TEXTS[:60]
    assert sum(n > 128 for n in lengths) >= 4, "the corpus should have texts over 128 tokens"
    for strategy in GROUPED:
        got = svc.predict(parse_request({"inputs": texts, "aggregation_strategy": strategy}, 1000))
        items, worst = compare(oracle(path, strategy, stride=63, texts=tuple(texts)), got, texts, 1e-3)
        assert max(a["end"] for a in got[0]) > 512, "the first text is read past its first window"
        record(
            f"{'wordpiece 128 pos':18} onnxruntime  {strategy:8} defaults (stride 63): {len(texts)} texts, "
            f"{items} entities equal"
        )
    fitting = [t for t, n in zip(TEXTS, lengths, strict=True) if n <= 128]
    got = svc.predict(parse_request({"inputs": fitting, "aggregation_strategy": "none"}, 1000))
    compare(oracle(path, "none", texts=tuple(fitting)), content_tokens(got, path), fitting, 1e-3)
    long_text = texts[0]
    whole = svc.predict(parse_request({"inputs": long_text}, 10))[0]
    assert [t["token_id"] for t in whole] == tokenizer(long_text)["input_ids"]
    svc.close()
