"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (JSON or SSE), /v1/models."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from mace.engine.api import RequestOutput
from mace.server.auth import PRINCIPAL, resolve_tenant
from mace.server.errors import ApiError, dumps, from_validation
from mace.server.generation import PreparedRequest, generate, prepare_chat, prepare_completion
from mace.server.keys import RUNTIME
from mace.server.protocol import ChatCompletionRequest, CompletionRequest

routes = web.RouteTableDef()
BodyT = TypeVar("BodyT", bound=BaseModel)


async def read_json(request: web.Request) -> Any:
    if "Content-Type" in request.headers and request.content_type != "application/json":
        raise ApiError(415, f"expected a JSON body (Content-Type: application/json), got {request.content_type}")
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


def parse_body(model: type[BodyT], data: Any) -> BodyT:
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    model = {"id": runtime.served_model_name, "object": "model", "created": 0, "owned_by": "mace"}
    if runtime.engine is not None:
        model["max_model_len"] = runtime.engine.max_model_len
    return web.json_response({"object": "list", "data": [model]}, dumps=dumps)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = parse_body(ChatCompletionRequest, await read_json(request))
    tenant = resolve_tenant(request[PRINCIPAL], body.user)
    return await _respond(request, prepare_chat(runtime, body, tenant), chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = parse_body(CompletionRequest, await read_json(request))
    tenant = resolve_tenant(request[PRINCIPAL], body.user)
    return await _respond(request, prepare_completion(runtime, body, tenant), chat=False)


async def _respond(request: web.Request, prepared: PreparedRequest, chat: bool) -> web.StreamResponse:
    with prepared.admission:
        if prepared.body.stream:
            return await _stream(request, prepared, chat)
        return await _complete(request, prepared, chat)


def usage(final: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": final.num_prompt_tokens,
        "completion_tokens": final.num_output_tokens,
        "total_tokens": final.num_prompt_tokens + final.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens},
    }


def fingerprint(adapter_version: int) -> str:
    return f"mace-adapter-v{adapter_version}"


def _envelope(prepared: PreparedRequest, chat: bool, adapter_version: int, streaming: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if chat else "text_completion"
    return {
        "id": prepared.request_id,
        "object": kind,
        "created": prepared.created,
        "model": prepared.body.model,
        "system_fingerprint": fingerprint(adapter_version),
    }


async def _complete(request: web.Request, prepared: PreparedRequest, chat: bool) -> web.Response:
    runtime = request.app[RUNTIME]
    parts: list[str] = []
    final: RequestOutput | None = None
    async for delta in generate(runtime, prepared):
        parts.append(delta.text)
        final = delta
    assert final is not None and final.finish_reason is not None  # generate() always ends with a finish
    if final.error is not None:
        raise ApiError(500, final.error, code="engine_error")
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "finish_reason": final.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = _envelope(prepared, chat, final.adapter_version, streaming=False)
    body.update(choices=[choice], usage=usage(final))
    return web.json_response(body, dumps=dumps)


async def _stream(request: web.Request, prepared: PreparedRequest, chat: bool) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": prepared.request_id}
    )
    await response.prepare(request)
    first = True
    async for delta in generate(runtime, prepared):
        if delta.error is not None:
            await _send(response, ApiError(500, delta.error, code="engine_error").body())
            break
        envelope = _envelope(prepared, chat, delta.adapter_version, streaming=True)
        if delta.text or first or delta.finish_reason is not None:
            await _send(response, {**envelope, "choices": [_chunk_choice(delta, chat, first)]})
            first = False
        if delta.finish_reason is not None and prepared.body.include_usage:
            await _send(response, {**envelope, "choices": [], "usage": usage(delta)})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _chunk_choice(delta: RequestOutput, chat: bool, first: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": delta.finish_reason, "logprobs": None}
    if chat:
        choice["delta"] = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
    else:
        choice["text"] = delta.text
    return choice


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")
