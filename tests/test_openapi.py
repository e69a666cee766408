"""The OpenAPI document: raw-body routes documented from their pydantic models."""

from __future__ import annotations

import httpx
import schemathesis
from openapi_spec_validator import validate as validate_openapi
from ttalign.server.app import create_app
from ttalign.server.openapi import ErrorResponse
from ttalign.server.protocol import ChatCompletionRequest, ScoreRequest

from tests.conftest import fake_settings
from tests.servers import RunningServer

CHAT = "/v1/chat/completions"
SCORE = "/v1/rewards/score"


def document() -> dict:
    return create_app(fake_settings()).openapi()


def test_document_is_valid_openapi_and_loads_in_schemathesis() -> None:
    spec = document()
    validate_openapi(spec)
    schema = schemathesis.openapi.from_dict(spec)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert {f"POST {CHAT}", f"POST {SCORE}", "GET /health"} <= labels


def test_request_bodies_follow_the_models() -> None:
    spec = document()
    schemas = spec["components"]["schemas"]
    for path, model in ((CHAT, ChatCompletionRequest), (SCORE, ScoreRequest)):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model.__name__}"
        }
        documented = schemas[model.__name__]["properties"]
        assert set(documented) == set(model.model_json_schema()["properties"])
    # Nested models land in components too, and every reference resolves.
    assert "ChatMessage" in schemas
    for ref in _refs(spec):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_errors_are_documented_in_openai_shape() -> None:
    spec = document()
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    responses = spec["paths"][CHAT]["post"]["responses"]
    for status in ("400", "404", "413", "429", "500", "502", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    assert "text/event-stream" in responses["200"]["content"]
    assert "400" in spec["paths"][SCORE]["post"]["responses"]


def test_metrics_is_documented_as_plain_text() -> None:
    content = document()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/plain"}


def test_document_is_built_once_and_served(fake_server: RunningServer) -> None:
    app = fake_server.app
    assert app.openapi() is app.openapi()
    served = httpx.get(f"{fake_server.base_url}/openapi.json").json()
    assert (
        served["paths"][CHAT]["post"]["requestBody"]
        == app.openapi()["paths"][CHAT]["post"]["requestBody"]
    )


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []
