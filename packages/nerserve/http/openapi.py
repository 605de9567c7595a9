"""The predict routes' OpenAPI description: the request schema, the answer's, and every error status
(the body is read by the route itself, body.read_json, so FastAPI cannot infer them)."""

from __future__ import annotations

from typing import Any

from ..schemas import PredictRequest, TokenResult

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
    (413, "Too large"),
    (422, "Validation"),
    (429, "Overloaded"),
    (500, "Backend"),
    (503, "Unhealthy"),
    (504, "Timeout"),
]


def predict_openapi() -> dict[str, Any]:
    """`openapi_extra` for each predict route."""
    answer = {"type": "array", "items": {"type": "array", "items": TokenResult.model_json_schema()}}
    return {
        "requestBody": {
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            "required": True,
        },
        "responses": {
            "200": {"description": "One list per text", "content": {"application/json": {"schema": answer}}},
            **{str(code): {"description": why, **_ERROR_SCHEMA} for code, why in _ERRORS},
        },
    }
