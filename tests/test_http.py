"""The server as a real process on a free port, over real HTTP: every route of API.md, the seed
request, a batch of 64 texts equal to the pipeline, and each bad input answered with its status
and error JSON while the server stays up."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from test_parity import compare, oracle

import corpus
from conftest import SEED, ServerProcess, real_checkpoint
from nerserve.metrics import STAGES

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(built):
    process = ServerProcess(
        {
            "CHECKPOINT": str(built("wordpiece-cased")),
            "ENGINE": "onnxruntime",
            "WORKERS": "2",  # the API as several front-end processes answer it
            "API_KEY": KEY,
            "MAX_TEXTS": "100",
            "MAX_BODY_BYTES": str(256 * 1024),
        }
    )
    first = None
    while first is None:  # the port opens before the model has loaded: /health must say so
        try:
            first = httpx.get(process.url + "/health", timeout=5)
        except httpx.HTTPError:
            if process.process.poll() is not None:
                raise RuntimeError(process.output()) from None
    process.first_health = first
    process.wait_ready()
    yield process
    assert process.stop(), process.output()


def post(server, body, path="/predict_tokens", headers=None, **kwargs) -> httpx.Response:
    headers = {**AUTH, "content-type": "application/json", **(headers or {})}
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60, **kwargs)


def test_health_is_503_while_loading_then_200(server) -> None:
    assert server.first_health.status_code == 503
    assert server.first_health.json()["error_type"] == "Unhealthy"
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_seed_request_on_every_predict_route(server, built) -> None:
    answers = [post(server, SEED, path) for path in ("/predict_tokens", "/predict", "/v1/models/model:predict")]
    assert all(a.status_code == 200 for a in answers)
    assert answers[0].json() == answers[1].json() == answers[2].json()
    text = SEED["inputs"][0][0]
    compare(oracle(str(built("wordpiece-cased")), "max", texts=(text,)), answers[0].json(), [text], 1e-3)


def test_batch_of_64_texts_equals_pipeline(server, built) -> None:
    texts = corpus.texts()[:64]
    for strategy in ("simple", "average"):
        response = post(server, {"inputs": texts, "aggregation_strategy": strategy, "truncate": True})
        assert response.status_code == 200, response.text
        compare(oracle(str(built("wordpiece-cased")), strategy, texts=tuple(texts)), response.json(), texts, 1e-3)


def test_input_shapes_flatten_in_order(server) -> None:
    nested = post(server, {"inputs": ["a b", ["c d", "e"], "f"]}).json()
    flat = post(server, {"inputs": ["a b", "c d", "e", "f"]}).json()
    single = post(server, {"inputs": "a b"}).json()
    assert nested == flat and len(flat) == 4 and single == flat[:1]


def test_none_keeps_special_tokens_and_raw_scores_gives_every_label(server) -> None:
    answer = post(server, {"inputs": ["Apple U.K."], "aggregation_strategy": "NONE", "raw_scores": True}).json()[0]
    assert answer[0]["token"] == "[CLS]" and answer[-1]["token"] == "[SEP]"
    assert all(len(item["results"]) == 9 for item in answer)
    assert all(item["token"] == "Apple U.K."[item["start"] : item["end"]] for item in answer[1:-1])


def test_info_metrics_openapi(server) -> None:
    info = httpx.get(server.url + "/info", headers=AUTH).json()
    assert info["engine"] == "onnxruntime" and info["max_input_tokens"] == 512 and len(info["labels"]) == 9
    assert info["window_stride"] == 128 and info["max_num_tokens"] == 1024 and info["version"]  # ORT's default
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in (
        "nerserve_requests_total",
        "nerserve_texts_total",
        "nerserve_tokens_total",
        "nerserve_queue_depth",
        "nerserve_batch_size_bucket",
        "nerserve_request_seconds_bucket",
        *(f'nerserve_stage_seconds_count{{stage="{stage}"}}' for stage in STAGES),
    ):
        assert name in metrics
    docs = httpx.get(server.url + "/docs", headers=AUTH)  # Swagger UI would load assets from a CDN: no such page
    assert docs.status_code == 404 and docs.json()["error_type"] == "NotFound"
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/predict_tokens", "/predict", "/v1/models/model:predict", "/health", "/info", "/metrics"):
        assert path in spec["paths"]
    hf = spec["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(hf["properties"]) == {"inputs", "parameters"}
    body = spec["paths"]["/predict_tokens"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {
        "inputs",
        "aggregation_strategy",
        "raw_scores",
        "truncate",
        "truncation_direction",
    }


def test_request_id_and_timing_headers(server) -> None:
    response = post(server, {"inputs": "x"}, headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert float(response.headers["x-total-time-ms"]) >= 0


def test_a_forged_request_id_cannot_forge_the_access_log(server) -> None:
    """The access line is written by a JSON encoder from a cleaned, bounded id: a log parser reads the
    request's own fields, never one the client smuggled in."""
    forged = 'x","status":999,"forged":"1' + "y" * 500
    response = post(server, {"inputs": "x"}, headers={"x-request-id": forged})
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    assert rid == ("xstatus:999forged:1" + "y" * 500)[:128]
    deadline = time.monotonic() + 10
    while not (lines := [line for line in server.output(None).splitlines() if rid in line]):
        assert time.monotonic() < deadline, "no access line for the request"
        time.sleep(0.1)
    record = json.loads(lines[-1][lines[-1].index("{") :])
    assert set(record) == {"request_id", "worker", "method", "path", "status", "ms"}
    assert (record["request_id"], record["status"], record["path"]) == (rid, 200, "/predict_tokens")


BAD = [
    # (body, headers, status, error_type, words the message must contain)
    (b"not json", {}, 400, "Validation", "JSON"),
    (b'{"inputs": ["\xff\xfe"]}', {}, 400, "Validation", "JSON"),
    (json.dumps({"inputs": ["a"]}), {"content-type": "text/plain"}, 400, "Validation", "content-type"),
    ({"inputs": []}, {}, 422, "Empty", "inputs"),
    ({"inputs": ["a", []]}, {}, 422, "Validation", "inputs[1]"),
    ({}, {}, 422, "Validation", "inputs"),
    ({"inputs": [1]}, {}, 422, "Validation", "inputs[0]"),
    ({"inputs": [[["a"]]]}, {}, 422, "Validation", "inputs[0]"),
    ({"inputs": None}, {}, 422, "Validation", "inputs"),
    ({"inputs": ["a"], "aggregation_strategy": "mean"}, {}, 422, "Validation", "aggregation_strategy"),
    ({"inputs": ["a"], "aggregation_strategy": 3}, {}, 422, "Validation", "aggregation_strategy"),
    ({"inputs": ["a"], "truncation_direction": "up"}, {}, 422, "Validation", "truncation_direction"),
    ({"inputs": ["a"], "truncate": "yes"}, {}, 422, "Validation", "truncate"),
    ({"inputs": ["a"], "raw_scores": 1}, {}, 422, "Validation", "raw_scores"),
    ({"inputs": ["a"], "raw_scores": True, "aggregation_strategy": "simple"}, {}, 422, "Validation", "raw_scores"),
    ({"inputs": ["a"], "unknown": 1}, {}, 422, "Validation", "unknown"),
    ([1, 2], {}, 422, "Validation", "body"),
    ({"inputs": ["a"] * 101}, {}, 413, "Validation", "101 texts"),
    ({"inputs": ["a" * (300 * 1024)]}, {}, 413, "Validation", "bytes"),
    ({"inputs": ["a"]}, {"Authorization": "Bearer wrong"}, 401, "Unauthorized", "API key"),
]


@pytest.mark.parametrize("body,headers,status,kind,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_error_json(server, body, headers, status, kind, words) -> None:
    response = post(server, body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error_type"] == kind
    assert words in response.json()["error"]
    assert post(server, {"inputs": "still up"}).status_code == 200


def test_api_key_header_forms(server) -> None:
    no_key = httpx.post(server.url + "/predict_tokens", json={"inputs": "a"})
    assert no_key.status_code == 401 and no_key.json()["error_type"] == "Unauthorized"
    assert httpx.post(server.url + "/predict_tokens", json={"inputs": "a"}, headers={"Api-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_hf_route_takes_the_key_as_every_route_does(server) -> None:
    """POST / (the Hugging Face API) needs the key though GET / (the page's redirect) does not; the
    client sends it as `Authorization: Bearer`."""
    answer = InferenceClient(model=server.url, token=KEY).token_classification("Wolfgang", aggregation_strategy="max")
    assert all(item.start == 0 for item in answer)
    with pytest.raises(HfHubHTTPError, match="API key"):
        InferenceClient(model=server.url).token_classification("Wolfgang")  # no token in the tests' HF_HOME
    for headers in ({"Api-Key": KEY}, {"Authorization": f"Api-Key {KEY}"}):
        assert httpx.post(server.url, json={"inputs": "a"}, headers=headers).status_code == 200
    assert httpx.get(server.url + "/").status_code == 307


def test_unknown_route_and_method_answer_json(server) -> None:
    assert httpx.get(server.url + "/nope", headers=AUTH).json()["error_type"] == "NotFound"
    assert httpx.get(server.url + "/predict_tokens", headers=AUTH).status_code == 405


def test_real_checkpoint_serves_the_seed_request() -> None:
    """What `nerserve serve ../shared/models/minilm-l6-conll03-ner` answers (Apple as ORG)."""
    process = ServerProcess({"ENGINE": "onnxruntime"}, args=[str(real_checkpoint())])
    try:
        process.wait_ready()
        answer = httpx.post(process.url + "/predict_tokens", json=SEED, timeout=60).json()
        assert answer[0][0]["token"] == "Apple" and answer[0][0]["results"].keys() == {"ORG"}
        assert (answer[0][0]["start"], answer[0][0]["end"]) == (0, 5)
    finally:
        assert process.stop(), process.output()
