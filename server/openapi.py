"""The OpenAPI document: what FastAPI cannot see for itself.

``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/rewards/score`` read
their raw bodies (it is
faster, and every parse failure becomes an OpenAI-shaped 400), so FastAPI finds no request
model to document. :func:`install_openapi` adds their request bodies and the error shape to
``/openapi.json``, generated from the pydantic models when the document is first asked
for, so it follows the models as fields are added.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from ttalign.server.completion_protocol import CompletionRequest
from ttalign.server.protocol import ChatCompletionRequest, ScoreRequest

#: Where pydantic's ``$defs`` go in an OpenAPI document.
REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    """The ``error`` object of every error response (OpenAI's shape)."""

    message: str = Field(description="What went wrong, for people.")
    type: str = Field(description="Error class, e.g. invalid_request_error.")
    param: str | None = Field(description="The offending request parameter, if one is to blame.")
    code: str | None = Field(description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """Body of every 4xx and 5xx response of the API routes."""

    error: ErrorDetail


@dataclass(frozen=True)
class RawBodyRoute:
    """A POST route that parses its own body with ``model``, and the errors it may send."""

    path: str
    model: type[BaseModel]
    error_statuses: tuple[int, ...]
    stream_media_type: str | None = None


RAW_BODY_ROUTES = (
    RawBodyRoute(
        "/v1/chat/completions",
        ChatCompletionRequest,
        (400, 404, 413, 429, 500, 502, 503),
        stream_media_type="text/event-stream",
    ),
    RawBodyRoute(
        "/v1/completions",
        CompletionRequest,
        (400, 404, 413, 429, 500, 502, 503),
        stream_media_type="text/event-stream",
    ),
    RawBodyRoute("/v1/rewards/score", ScoreRequest, (400, 413, 429, 500, 502, 503)),
)

#: Routes whose success body is not JSON, by path and media type.
PLAIN_TEXT_ROUTES = {"/metrics": "text/plain"}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) document the raw-body routes."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # FastAPI caches the document it returns in app.openapi_schema; complete it once.
            complete_document(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def complete_document(document: dict[str, Any]) -> None:
    """Add request bodies, error responses and non-JSON media types to ``document``."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (route.model, "validation") for route in RAW_BODY_ROUTES
    ]
    wanted.append((ErrorResponse, "serialization"))
    references, definitions = models_json_schema(wanted, ref_template=REF_TEMPLATE)
    error_schema = references[(ErrorResponse, "serialization")]
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(definitions.get("$defs", {}))

    paths = document.get("paths", {})
    for route in RAW_BODY_ROUTES:
        operation = paths.get(route.path, {}).get("post")
        if operation is None:
            continue
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": references[(route.model, "validation")]}},
        }
        responses = operation.setdefault("responses", {})
        if route.stream_media_type:
            content = responses.setdefault("200", {}).setdefault("content", {})
            content[route.stream_media_type] = {"schema": {"type": "string"}}
        for status in route.error_statuses:
            responses[str(status)] = {
                "description": HTTPStatus(status).phrase,
                "content": {"application/json": {"schema": error_schema}},
            }

    for path, media_type in PLAIN_TEXT_ROUTES.items():
        success = paths.get(path, {}).get("get", {}).get("responses", {}).get("200")
        if success is not None:
            success["content"] = {media_type: {"schema": {"type": "string"}}}
