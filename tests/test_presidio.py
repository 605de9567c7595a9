"""`nerserve.presidio.NerServeRecognizer` in the real presidio-analyzer and presidio-anonymizer, against the
shared real server process: its results are the server's entities mapped by Presidio's own label mapping
(MISC dropped), above the minimum score; BatchAnalyzerEngine sends a list of texts in few requests (counted
on the wire) with the same results; the server's errors raised with its message; AnonymizerEngine
replaces exactly those spans. Presidio's NLP engine is a blank spaCy pipeline saved to a temporary
folder: nothing is downloaded."""

from __future__ import annotations

import httpx
import pytest

import corpus

presidio_analyzer = pytest.importorskip("presidio_analyzer")
pytest.importorskip("presidio_anonymizer")
from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry  # noqa: E402
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpEngineProvider  # noqa: E402
from presidio_anonymizer import AnonymizerEngine  # noqa: E402

from nerserve.presidio import NerServeError, NerServeRecognizer  # noqa: E402

TEXTS = [text for text in corpus.texts(60)[:-4] if text.strip()][:30]
ENTITIES = ["PERSON", "LOCATION", "ORGANIZATION"]
MIN_SCORE = 0.3


@pytest.fixture(scope="module")
def blank_nlp(tmp_path_factory):
    import spacy

    folder = tmp_path_factory.mktemp("spacy-blank-en")
    spacy.blank("en").to_disk(folder)
    configuration = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": str(folder)}]}
    return NlpEngineProvider(nlp_configuration=configuration).create_engine()


def analyzer_with(recognizer: NerServeRecognizer, nlp_engine) -> AnalyzerEngine:
    """An analyzer whose only recognizer is `recognizer` (Presidio's regex recognizers left out, so every
    result is the server's)."""
    analyzer = AnalyzerEngine(nlp_engine=nlp_engine, registry=RecognizerRegistry(supported_languages=["en"]))
    return recognizer.add_to(analyzer)


@pytest.fixture(scope="module")
def answers(server) -> list[list[dict]]:
    response = httpx.post(server.url + "/predict_tokens", json={"inputs": TEXTS, "aggregation_strategy": "max"})
    assert response.status_code == 200, response.text
    return response.json()


def expected(answer: list[dict]) -> list[tuple[str, int, int]]:
    """The server's entities as the recognizer must report them: mapped, MISC gone, scored high enough."""
    mapping = NerModelConfiguration().model_to_presidio_entity_mapping
    out = []
    for item in answer:
        label, score = next(iter(item["results"].items()))
        if label in mapping and score >= MIN_SCORE:
            out.append((mapping[label], item["start"], item["end"]))
    return sorted(out, key=lambda entity: entity[1])


def found(results) -> list[tuple[str, int, int]]:
    return sorted(((r.entity_type, r.start, r.end) for r in results), key=lambda entity: entity[1])


def test_default_mapping_is_presidios_own(server) -> None:
    recognizer = NerServeRecognizer(server.url)
    assert recognizer.mapping == NerModelConfiguration().model_to_presidio_entity_mapping
    assert {"PERSON", "LOCATION", "ORGANIZATION"} <= set(recognizer.get_supported_entities())
    assert "MISC" not in recognizer.mapping
    with pytest.raises(ValueError, match="aggregation_strategy"):
        NerServeRecognizer(server.url, aggregation_strategy="none")


def test_analyzer_and_batch_analyzer_equal_the_servers_entities(server, answers, blank_nlp) -> None:
    requests: list[httpx.Request] = []
    client = httpx.Client(event_hooks={"request": [requests.append]}, timeout=60)
    recognizer = NerServeRecognizer(server.url, min_score=MIN_SCORE, batch_texts=12, client=client)
    analyzer = analyzer_with(recognizer, blank_nlp)
    want = [expected(answer) for answer in answers]
    assert sum(map(len, want)) > 20 and any(len(w) < len(a) for w, a in zip(want, answers, strict=True))
    for text, entities in zip(TEXTS[:5], want, strict=False):
        assert found(analyzer.analyze(text, language="en", entities=ENTITIES)) == entities
    assert len(requests) == 5  # one text, one request
    requests.clear()
    batch = BatchAnalyzerEngine(analyzer).analyze_iterator(TEXTS, language="en", batch_size=4)
    assert [found(results) for results in batch] == want
    assert len(requests) == 3  # 30 texts in requests of up to 12
    only_people = analyzer.analyze(TEXTS[0], language="en", entities=["PERSON"])
    assert found(only_people) == [entity for entity in want[0] if entity[0] == "PERSON"]


def test_errors_carry_the_servers_message(server) -> None:
    with pytest.raises(NerServeError, match="answered 413: Validation: inputs: 1025 texts exceed the limit of 1024"):
        NerServeRecognizer(server.url, batch_texts=2000).predict(["a"] * 1025)
    with pytest.raises(NerServeError, match="answered 404: NotFound"):
        NerServeRecognizer(server.url + "/nowhere").predict(["a"])


def test_anonymizer_replaces_the_recognized_spans(server, answers, blank_nlp) -> None:
    analyzer = analyzer_with(NerServeRecognizer(server.url, min_score=MIN_SCORE), blank_nlp)
    anonymizer = AnonymizerEngine()
    for text, answer in zip(TEXTS[:8], answers, strict=False):
        results = analyzer.analyze(text, language="en", entities=ENTITIES)
        want = text
        for entity, start, end in reversed(expected(answer)):
            want = want[:start] + f"<{entity}>" + want[end:]
        assert anonymizer.anonymize(text=text, analyzer_results=results).text == want
