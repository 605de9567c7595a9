"""The OpenAPI description FastAPI cannot infer: the predict routes' request schema, their answer's and
every error status (the body is read by the route itself, body.read_json), and /metrics as the
Prometheus text it is served as."""

from __future__ import annotations

from typing import Any

from ..schemas import HfRequest, PredictRequest, TokenResult

_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "error_type"],
                "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
            }
        }
    }
}
_ERRORS = [
    (400, "Not JSON"),
    (401, "Unauthorized"),
    (413, "Too large: bytes, texts or tokens over their limit"),
    (422, "Validation"),
    (429, "Overloaded: the engine's queue is full (Retry-After)"),
    (500, "Backend"),
    (503, "Unhealthy (loading, draining), or Overloaded: this worker's transport space is full (Retry-After)"),
    (504, "Timeout"),
]

#: what /metrics is served as: Prometheus' text exposition format
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format 0.0.4, summed over every process of the server",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


#: one item of the pipeline's answer: `entity` and `index` with strategy none, `entity_group` with the others
_HF_ITEM = {
    "type": "object",
    "required": ["score", "word", "start", "end"],
    "properties": {
        "entity": {"type": "string"},
        "entity_group": {"type": "string"},
        "score": {"type": "number"},
        "index": {"type": "integer"},
        "word": {"type": "string"},
        "start": {"type": "integer"},
        "end": {"type": "integer"},
    },
}


def predict_openapi() -> dict[str, Any]:
    """`openapi_extra` for each predict route."""
    answer = {"type": "array", "items": {"type": "array", "items": TokenResult.model_json_schema()}}
    return _described(PredictRequest.model_json_schema(), "One list per text", answer)


def hf_openapi() -> dict[str, Any]:
    """`openapi_extra` for the Hugging Face token-classification route (POST /); its request's nested
    model (`parameters`) written in place, as pydantic's `$defs` would be refs no reader can resolve there."""
    answer = {
        "anyOf": [
            {"type": "array", "items": _HF_ITEM},
            {"type": "array", "items": {"type": "array", "items": _HF_ITEM}},
        ]
    }
    why = "transformers.pipeline's answer: a list of items for one text, a list of lists for a list of texts"
    return _described(_inlined(HfRequest.model_json_schema()), why, answer)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each `{"$ref": "#/$defs/X"}` replaced by X itself (pydantic's models here nest no cycle)."""
    definitions = schema.pop("$defs", {})

    def resolved(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolved(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolved(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(value) for value in node]
        return node

    return resolved(schema)


def _described(request: dict[str, Any], answered: str, answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {"content": {"application/json": {"schema": request}}, "required": True},
        "responses": {
            "200": {"description": answered, "content": {"application/json": {"schema": answer}}},
            **{str(code): {"description": why, **_ERROR_SCHEMA} for code, why in _ERRORS},
        },
    }
