"""The Hugging Face token-classification API on `POST /`, through the real `huggingface_hub.InferenceClient`
against a real server process: every answer equal to `transformers.pipeline("token-classification")` called
with the same text and parameters (labels, `word`, `index`, offsets exactly; scores within 1e-3 on ONNX
Runtime), `stride` on a long text, `ignore_labels`, a list of texts, the errors. The other tokenizer kinds
(byte-level BPE, whose words the pipeline finds by its fallback rule and decodes from byte-level tokens)
goes through the same route's code in process, on PyTorch; `bench/hf_api.py` checks the shared real
checkpoint on CoNLL sentences."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from test_parity import _pipeline_forwards

import corpus
from conftest import record
from nerserve.config import Settings
from nerserve.schemas import STRATEGIES, parse_hf_request
from nerserve.service import InProcessService

#: the fixed hard cases (accents, CJK, emoji, punctuation, [UNK]s, empty) and a few random sentences
TEXTS = corpus.FIXED + corpus.texts()[len(corpus.FIXED) : len(corpus.FIXED) + 4]
LONG = next(text for text in corpus.texts() if len(text) > 2000)
STRIDE = 40  # not the server's window_stride (128), so the route's own overlap is what reads the text


def pipeline_answers(path: str, texts: list[str], stride: int | None = None, **parameters: Any) -> list[list[dict]]:
    """What `pipeline("token-classification")(text, stride=stride, **parameters)` returns for each text: its
    own postprocess over its own model outputs, which are computed once for every strategy and parameter."""
    classifier, outputs = _pipeline_forwards(path, "right", stride, tuple(texts))
    _, _, postprocess = classifier._sanitize_parameters(**parameters)
    return [list(classifier.postprocess(chunks, **postprocess)) for chunks in outputs]


def assert_equal(want: list[dict], got: list[dict], tolerance: float) -> int:
    """Same items, keys and values (scores within `tolerance`); returns how many."""
    assert [{k: v for k, v in item.items() if k != "score"} for item in got] == [
        {k: (int(v) if k in ("start", "end", "index") else v) for k, v in item.items() if k != "score"} for item in want
    ]
    assert [item["score"] for item in got] == pytest.approx([float(item["score"]) for item in want], abs=tolerance)
    return len(want)


def as_dicts(elements: list[Any]) -> list[dict]:
    """The client's TokenClassificationOutputElement objects as the JSON items they were made from."""
    return [{k: v for k, v in vars(element).items() if v is not None} for element in elements]


def test_client_equals_pipeline_for_every_strategy(server, built) -> None:
    client = InferenceClient(model=server.url)
    path = str(built("wordpiece-cased"))
    for strategy in STRATEGIES:
        items = sum(
            assert_equal(want, as_dicts(client.token_classification(text, aggregation_strategy=strategy)), 1e-3)
            for text, want in zip(TEXTS, pipeline_answers(path, TEXTS, aggregation_strategy=strategy), strict=True)
        )
        assert items > len(TEXTS), strategy
        record(f"POST / (InferenceClient)  wordpiece-cased {strategy:8} {len(TEXTS)} texts, {items} items equal")


def test_the_api_has_a_path_of_its_own_beside_the_root(server) -> None:
    """`/hf` answers as `/` does: on Baseten, Truss's nginx rewrites `/` to the liveness probe, so the
    client is pointed at the deployment's URL + `/hf` there."""
    for strategy in ("none", "max"):
        at_root = as_dicts(
            InferenceClient(model=server.url).token_classification(TEXTS[0], aggregation_strategy=strategy)
        )
        own_path = InferenceClient(model=server.url + "/hf").token_classification(
            TEXTS[0], aggregation_strategy=strategy
        )
        assert as_dicts(own_path) == at_root and at_root, strategy


def test_stride_reads_a_long_text_as_the_pipeline_does(server, built) -> None:
    client = InferenceClient(model=server.url)
    path = str(built("wordpiece-cased"))
    for strategy in STRATEGIES[1:]:
        (want,) = pipeline_answers(path, [LONG], STRIDE, aggregation_strategy=strategy)
        got = as_dicts(client.token_classification(LONG, aggregation_strategy=strategy, stride=STRIDE))
        items = assert_equal(want, got, 1e-3)
        (cut,) = pipeline_answers(path, [LONG], aggregation_strategy=strategy)  # no stride: cut to the window
        assert max(item["end"] for item in got) > max(item["end"] for item in cut)
        record(f"POST / (InferenceClient)  wordpiece-cased {strategy:8} stride {STRIDE}: {items} entities equal")


def test_ignore_labels_and_a_list_of_texts(server, built) -> None:
    path = str(built("wordpiece-cased"))
    client = InferenceClient(model=server.url)
    for strategy, ignore in (("none", []), ("simple", ["PER", "O"]), ("max", ["LOC"])):
        got = client.token_classification(TEXTS[8], aggregation_strategy=strategy, ignore_labels=ignore)
        (want,) = pipeline_answers(path, [TEXTS[8]], aggregation_strategy=strategy, ignore_labels=ignore)
        assert_equal(want, as_dicts(got), 1e-3)
    answer = httpx.post(server.url, json={"inputs": TEXTS[:6], "parameters": {"aggregation_strategy": "first"}})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 6
    for want, got in zip(pipeline_answers(path, TEXTS[:6], aggregation_strategy="first"), answer.json(), strict=True):
        assert_equal(want, got, 1e-3)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": "a", "parameters": {"stride": 8}}, 422, "parameters.stride: the pipeline reads whole texts only"),
        ({"inputs": "a", "parameters": {"stride": 510, "aggregation_strategy": "max"}}, 422, "less than 510"),
        ({"inputs": "a", "parameters": {"stride": -1, "aggregation_strategy": "max"}}, 422, "must not be negative"),
        (
            {"inputs": "a", "parameters": {"aggregation_strategy": "best"}},
            422,
            "parameters.aggregation_strategy: must be",
        ),
        ({"inputs": "a", "parameters": {"top_k": 3}}, 422, "parameters.top_k"),
        ({"inputs": []}, 422, "inputs: must hold at least one text"),
        ({"inputs": [["a"]]}, 422, "inputs[0]"),
        ({"text": "a"}, 422, "inputs"),
    ],
)
def test_errors_are_the_apis(server, body: dict, status: int, message: str) -> None:
    answer = httpx.post(server.url, json=body)
    assert answer.status_code == status and message in answer.json()["error"], answer.text
    assert answer.json()["error_type"] in ("Validation", "Empty")


def test_client_raises_the_servers_message(server) -> None:
    with pytest.raises(HfHubHTTPError, match="parameters.stride"):
        InferenceClient(model=server.url).token_classification("a b", stride=4)
    assert httpx.get(server.url + "/").status_code == 307  # browsers still get the page


def hf_in_process(svc: InProcessService, payload: dict) -> Any:
    """The route's code path without HTTP: parse, tokenize, score on the engine, the pipeline's items."""
    request = parse_hf_request(payload, 10_000)
    prepared = svc.frontend.prepare(request.predict_request(), stride=request.parameters.stride)
    scores = svc.core.score(prepared.sequences, prepared.keep_logits).result(60)
    return svc.frontend.hf_answer(prepared, request.ignore_labels, scores)


def test_bpe_equals_pipeline(built) -> None:
    path = str(built("bpe"))
    svc = InProcessService(Settings(checkpoint=path, engine="torch"))
    for strategy in STRATEGIES:
        got = hf_in_process(svc, {"inputs": TEXTS, "parameters": {"aggregation_strategy": strategy}})
        want = pipeline_answers(path, TEXTS, aggregation_strategy=strategy)
        items = sum(assert_equal(expected, answer, 1e-4) for expected, answer in zip(want, got, strict=True))
        record(f"POST / (in process, torch) bpe {strategy:8} {len(TEXTS)} texts, {items} items equal")
    got = hf_in_process(svc, {"inputs": LONG, "parameters": {"aggregation_strategy": "average", "stride": STRIDE}})
    assert_equal(pipeline_answers(path, [LONG], STRIDE, aggregation_strategy="average")[0], got[0], 1e-4)


def test_fuzzing_from_openapi(server) -> None:
    """Schemathesis bodies for POST / from the server's own schema: never a 500, errors in the API's shape."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    operation = schemathesis.openapi.from_url(server.url + "/openapi.json")["/"]["POST"]
    statuses: Counter = Counter()
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text
        if response.status_code != 200:
            assert set(response.json()) == {"error", "error_type"}

    fuzz()
    assert statuses[200] > 20 and statuses[422] > 20, statuses
    record(f"POST / fuzzing: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
