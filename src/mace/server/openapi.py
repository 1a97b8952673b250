"""GET /openapi.json: an OpenAPI 3.1 description built from the pydantic request models and the route table.

The request schemas are the models' own `model_json_schema()`, so the document cannot drift from
what the server validates; fuzz tests (tests/server/test_fuzz.py) generate requests from it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mace.server.errors import dumps
from mace.server.feedback_api import FeedbackSample
from mace.server.keys import RUNTIME
from mace.server.protocol import ChatCompletionRequest, CompletionRequest
from mace.server.stats_api import MAX_WINDOW_S

routes = web.RouteTableDef()

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, FeedbackSample)
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
    }}},
}
_ERRORS = {
    "400": "invalid request", "401": "missing or invalid API key", "403": "the key lacks the scope",
    "413": "body too large", "415": "not JSON", "429": "rate limited or at capacity (Retry-After)",
    "503": "not ready, shutting down, or the journal cannot store samples (Retry-After)",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _operation(summary: str, scope: str | None, body: dict[str, Any] | None = None,
               ok: str = "200", params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": "success", "content": {"application/json": {}}}}
    responses.update({status: {"description": what, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
                      for status, what in _ERRORS.items() if scope is not None or status in ("503",)})
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        operation["parameters"] = params
    operation["security"] = [{"bearer": []}] if scope is not None else []
    if scope is not None:
        operation["x-mace-scope"] = scope
    return operation


def _paths() -> dict[str, Any]:
    feedback_body = {"anyOf": [_ref(FeedbackSample), {"type": "array", "items": _ref(FeedbackSample)}]}
    version = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]
    window = [{"name": "window_s", "in": "query", "required": False,
               "schema": {"type": "number", "minimum": 0.5, "maximum": MAX_WINDOW_S}}]
    lineage = [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "the tenant whose lineage to act on (empty: the shared one); default the key's own"},
               {"name": "user", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "instead of tenant: this end user's tenant, as a generation's `user` field"}]
    api_key = [{"name": "api_key", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "for browsers, which cannot set headers on a websocket upgrade"}]
    return {
        "/v1/chat/completions": {"post": _operation("Chat completion (SSE with stream: true)", "infer",
                                                    _ref(ChatCompletionRequest))},
        "/v1/completions": {"post": _operation("Text completion (SSE with stream: true)", "infer",
                                               _ref(CompletionRequest))},
        "/v1/models": {"get": _operation("The served model", "infer")},
        "/v1/ws": {"get": _operation("Websocket chat (docs/websocket.md)", "infer", ok="101", params=api_key)},
        "/v1/feedback": {"post": _operation("Store training samples", "train", feedback_body, ok="202"),
                         "get": _operation("Journal counts", "train")},
        "/v1/adapters": {"get": _operation("A tenant's adapter versions", "infer", params=lineage)},
        "/v1/stats": {"get": _operation("Live figures for the dashboard over a recent window", "infer", params=window)},
        "/v1/adapters/{version}/activate": {"post": _operation(
            "Activate (roll back or forward) a version of a tenant's lineage; the shared one needs admin", "train",
            params=version + lineage)},
        "/health": {"get": _operation("Liveness", None)},
        "/ready": {"get": _operation("Readiness", None)},
        "/metrics": {"get": _operation("Prometheus metrics", None)},
        "/openapi.json": {"get": _operation("This document", None)},
    }


def build_spec(title: str) -> dict[str, Any]:
    _, definitions = models_json_schema([(model, "validation") for model in _MODELS], ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": _paths(),
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    spec = build_spec(f"mace ({request.app[RUNTIME].served_model_name})")
    return web.json_response(spec, dumps=dumps)
