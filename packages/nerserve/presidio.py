"""A Presidio recognizer for any BEI-Bert-compatible endpoint (`POST /predict_tokens`: this server, or a
Baseten BEI-Bert deployment), so Presidio's AnalyzerEngine finds names, places and organizations with a
served model instead of one loaded in its own process.

An optional extra (`pip install .[presidio]`): the server never imports this module.

Presidio analyzes one text at a time (`EntityRecognizer.analyze`), and BatchAnalyzerEngine hands its
whole list to the NLP engine first (`process_batch`) and only then to the recognizers, text by text.
So `add_to(analyzer)` registers the recognizer and puts a `BatchingNlpEngine` in front of the analyzer's
NLP engine: each batch of texts on its way through the NLP engine is sent in one request, and the
recognizer then answers each text from that request's answer. A text analyzed alone is one request."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx
from presidio_analyzer import AnalysisExplanation, AnalyzerEngine, RecognizerResult, RemoteRecognizer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, NlpEngine

#: the aggregation strategies whose answers are entities (with `none` each token is its own item)
GROUPED = ("simple", "first", "average", "max")


def presidio_mapping() -> dict[str, str]:
    """Presidio's own model-label -> Presidio-entity mapping: what its TransformersNlpEngine uses by
    default (NerModelConfiguration's), so PER is PERSON, LOC LOCATION, ORG ORGANIZATION; MISC is not in it."""
    mapping = NerModelConfiguration().model_to_presidio_entity_mapping
    return dict(mapping or {})


class NerServeError(RuntimeError):
    """The endpoint refused or failed a request: its status and its own message."""


class NerServeRecognizer(RemoteRecognizer):
    """Entities from a BEI-Bert-compatible endpoint as Presidio RecognizerResults.

    `url`: the server's root or the deployment's base URL (`/predict_tokens` is appended); `api_key`:
    sent as `Authorization: Api-Key KEY` (Baseten's form; this server takes it too). `label_mapping`:
    model label -> Presidio entity (default `presidio_mapping()`); labels it does not map are dropped.
    `aggregation_strategy`: a grouped strategy (default max, as Presidio's transformers configuration).
    `min_score`: entities scored lower are dropped. `batch_texts`: the most texts in one request."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        label_mapping: Mapping[str, str] | None = None,
        aggregation_strategy: str = "max",
        min_score: float = 0.0,
        supported_language: str = "en",
        batch_texts: int = 256,
        timeout_s: float = 60.0,
        name: str = "NerServeRecognizer",
        client: httpx.Client | None = None,
    ) -> None:
        if aggregation_strategy.lower() not in GROUPED:
            raise ValueError(
                f"aggregation_strategy must be one of {', '.join(GROUPED)} (entities), not {aggregation_strategy!r}"
            )
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be between 0 and 1, not {min_score}")
        if batch_texts < 1:
            raise ValueError(f"batch_texts must be positive, not {batch_texts}")
        self.mapping = dict(presidio_mapping() if label_mapping is None else label_mapping)
        self.aggregation_strategy = aggregation_strategy.lower()
        self.min_score = min_score
        self.recognizer_name = name  # EntityRecognizer's `name` is untyped
        self.batch_texts = batch_texts
        self.endpoint = url.rstrip("/") + "/predict_tokens"
        self.headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s)
        #: answers fetched for a batch ahead of the texts' analysis: text -> answers, in order
        self._prefetched: dict[str, collections.deque[list[dict[str, Any]]]] = {}
        super().__init__(
            supported_entities=sorted(set(self.mapping.values())),
            name=name,
            supported_language=supported_language,
            version="1.0",
        )

    def get_supported_entities(self) -> list[str]:
        return self.supported_entities

    def close(self) -> None:
        """Close the HTTP client's connections."""
        self.client.close()

    def add_to(self, analyzer: AnalyzerEngine) -> AnalyzerEngine:
        """Register this recognizer with `analyzer` and batch its requests with the analyzer's NLP
        engine (module docstring); returns the analyzer."""
        analyzer.registry.add_recognizer(self)
        if not isinstance(analyzer.nlp_engine, BatchingNlpEngine):
            analyzer.nlp_engine = BatchingNlpEngine(analyzer.nlp_engine, self)
        return analyzer

    def predict(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        """The endpoint's entities for `texts`, in requests of up to `batch_texts` texts; NerServeError
        with the endpoint's status and message when it answers with an error."""
        answers: list[list[dict[str, Any]]] = []
        for start in range(0, len(texts), self.batch_texts):
            chunk = texts[start : start + self.batch_texts]
            payload = {"inputs": chunk, "aggregation_strategy": self.aggregation_strategy}
            response = self.client.post(self.endpoint, json=payload, headers=self.headers)
            if response.status_code != 200:
                raise NerServeError(f"{self.endpoint} answered {response.status_code}: {_message(response)}")
            answers.extend(response.json())
        return answers

    def prefetch(self, texts: list[str]) -> None:
        """Fetch the answers of a batch of texts about to be analyzed (BatchingNlpEngine calls it),
        replacing those of the batch before (a text that was never analyzed holds nothing for long)."""
        self._prefetched = {}
        for text, answer in zip(texts, self.predict(texts), strict=True):
            self._prefetched.setdefault(text, collections.deque()).append(answer)

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        """The mapped entities of `text` that Presidio asked for, scored at least `min_score`."""
        waiting = self._prefetched.get(text)
        answer = waiting.popleft() if waiting else self.predict([text])[0]
        results = []
        for item in answer:
            label, score = next(iter(item["results"].items()))
            entity = self.mapping.get(label)
            if entity is None or entity not in entities or score < self.min_score:
                continue
            explanation = AnalysisExplanation(
                recognizer=self.recognizer_name,
                original_score=score,
                textual_explanation=f"{label} by the model at {self.endpoint}",
            )
            results.append(
                RecognizerResult(
                    entity_type=entity,
                    start=item["start"],
                    end=item["end"],
                    score=score,
                    analysis_explanation=explanation,
                    recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.recognizer_name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    },
                )
            )
        return results


class BatchingNlpEngine(NlpEngine):
    """An NLP engine in front of another that hands each batch of texts to the recognizer
    (`prefetch`: one request) before they go through the engine it fronts; everything else is that
    engine's."""

    def __init__(self, inner: NlpEngine, recognizer: NerServeRecognizer) -> None:
        self.inner, self.recognizer = inner, recognizer

    def process_batch(
        self, texts: Iterable[str], language: str, batch_size: int = 1, n_process: int = 1, **kwargs: Any
    ) -> Iterator[tuple[Any, ...]]:
        """The inner engine's artifacts, text by text, each batch of `recognizer.batch_texts` texts
        (Presidio's `batch_size` when larger) prefetched in one request first."""
        size = max(batch_size, self.recognizer.batch_texts)
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == size:
                yield from self._batch(batch, language, batch_size, n_process, **kwargs)
                batch = []
        if batch:
            yield from self._batch(batch, language, batch_size, n_process, **kwargs)

    def _batch(
        self, texts: list[str], language: str, batch_size: int, n_process: int, **kwargs: Any
    ) -> Iterator[tuple[Any, ...]]:
        self.recognizer.prefetch([str(text) for text in texts])
        yield from self.inner.process_batch(texts, language, batch_size=batch_size, n_process=n_process, **kwargs)

    def load(self) -> None:
        self.inner.load()

    def is_loaded(self) -> bool:
        return self.inner.is_loaded()

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        return self.inner.process_text(text, language)

    def is_stopword(self, word: str, language: str) -> bool:
        return self.inner.is_stopword(word, language)

    def is_punct(self, word: str, language: str) -> bool:
        return self.inner.is_punct(word, language)

    def get_supported_entities(self) -> list[str]:
        return self.inner.get_supported_entities()

    def get_supported_languages(self) -> list[str]:
        return self.inner.get_supported_languages()


def _message(response: httpx.Response) -> str:
    """The endpoint's own error message (`{"error": ...}`), else its body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "error" in body:
        kind = body.get("error_type")
        return f"{kind}: {body['error']}" if kind else str(body["error"])
    return response.text[:500]
