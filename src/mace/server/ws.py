"""Websocket chat at /v1/ws: several conversations multiplexed on one socket by `id`.

Client -> server: {"type": "chat", "id", "messages", ...same sampling fields as chat completions}
                  {"type": "cancel", "id"}   {"type": "ping"}
Server -> client: {"type": "delta", "id", "text"}
                  {"type": "done", "id", "finish_reason", "usage", "adapter_version", "system_fingerprint"}
                  {"type": "error", "id", "error": {message, type, param, code}}   {"type": "pong"}
See docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from mace.server.auth import GUARD, PRINCIPAL, Guard
from mace.server.errors import ApiError
from mace.server.generation import PreparedRequest, generate, prepare_chat
from mace.server.keys import RUNTIME
from mace.server.limits import TokenBucket
from mace.server.openai_api import fingerprint, parse_body, usage
from mace.server.protocol import ChatCompletionRequest
from mace.server.runtime import Runtime

routes = web.RouteTableDef()
MAX_CONVERSATIONS_PER_SOCKET = 16


class _Socket:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.principal = request[PRINCIPAL]
        rate = request.app[RUNTIME].config.server.ws_messages_per_s
        self.messages = TokenBucket(rate, 2 * rate)

    async def send(self, payload: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(orjson.dumps(payload).decode())

    async def send_error(self, conversation_id: Any, error: ApiError) -> None:
        await self.send({"type": "error", "id": conversation_id, **error.body()})

    async def handle(self, data: str) -> None:
        wait_s = self.messages.take()
        if wait_s > 0:  # the message is dropped; a client that keeps flooding only gets these errors back
            await self.send_error(None, ApiError(
                429, f"too many messages on this socket; slow down for {wait_s:.2f}s", code="rate_limit_exceeded"))
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            await self.send_error(None, ApiError(400, f"the message is not valid JSON: {exc}", code="invalid_json"))
            return
        if not isinstance(message, dict):
            await self.send_error(None, ApiError(400, "a message must be a JSON object", code="invalid_json"))
            return
        kind = message.get("type")
        conversation_id = message.get("id")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "cancel":
            task = self.tasks.pop(str(conversation_id), None)  # the id is free again at once
            if task is not None:
                task.cancel()
        elif kind == "chat":
            await self._start_chat(conversation_id, message)
        else:
            await self.send_error(
                conversation_id, ApiError(400, "type must be one of chat, cancel, ping", param="type")
            )

    async def _start_chat(self, conversation_id: Any, message: dict[str, Any]) -> None:
        if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > 128:
            await self.send_error(conversation_id, ApiError(400, "id must be a non-empty string", param="id"))
            return
        if conversation_id in self.tasks:
            await self.send_error(conversation_id, ApiError(400, "this id is already generating", param="id"))
            return
        if len(self.tasks) >= MAX_CONVERSATIONS_PER_SOCKET:
            await self.send_error(
                conversation_id, ApiError(429, "too many conversations on this socket", code="too_many_streams")
            )
            return
        runtime = self.request.app[RUNTIME]
        guard = self.request.app[GUARD]
        fields = {k: v for k, v in message.items() if k not in ("type", "id")}
        fields.setdefault("model", runtime.served_model_name)
        try:
            runtime.check_admission()
            guard.count_request(self.principal)
            body = parse_body(ChatCompletionRequest, fields)
            prepared = prepare_chat(runtime, body)
            runtime.admit_generation()
        except ApiError as exc:
            await self.send_error(conversation_id, exc)
            return
        try:
            guard.start_stream(self.principal)
        except ApiError as exc:
            runtime.end_generation()
            await self.send_error(conversation_id, exc)
            return
        task = asyncio.create_task(self._run_chat(conversation_id, prepared))
        task.add_done_callback(lambda _: self._release(guard, runtime))
        self.tasks[conversation_id] = task
        task.add_done_callback(lambda done: self._forget(conversation_id, done))

    async def _run_chat(self, conversation_id: str, prepared: PreparedRequest) -> None:
        with self.request.app[RUNTIME].in_flight(), contextlib.suppress(ConnectionResetError):
            await self._stream_chat(conversation_id, prepared)  # the socket closed: leaving generate() aborts

    async def _stream_chat(self, conversation_id: str, prepared: PreparedRequest) -> None:
        runtime = self.request.app[RUNTIME]
        async for delta in generate(runtime, prepared):
            if delta.error is not None:
                await self.send_error(conversation_id, ApiError(500, delta.error, code="engine_error"))
                return
            if delta.text:
                await self.send({"type": "delta", "id": conversation_id, "text": delta.text})
            if delta.finish_reason is not None:
                await self.send({
                    "type": "done",
                    "id": conversation_id,
                    "finish_reason": delta.finish_reason,
                    "usage": usage(delta),
                    "adapter_version": delta.adapter_version,
                    "system_fingerprint": fingerprint(delta.adapter_version),
                })

    def _release(self, guard: Guard, runtime: Runtime) -> None:
        """A conversation's slots are given back when its task ends, however it ends."""
        guard.end_stream(self.principal)
        runtime.end_generation()

    def _forget(self, conversation_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(conversation_id) is task:
            del self.tasks[conversation_id]

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@routes.get("/v1/ws")
async def websocket_chat(request: web.Request) -> web.WebSocketResponse:
    runtime = request.app[RUNTIME]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=runtime.config.server.ws_max_frame_bytes)
    await ws.prepare(request)
    socket = _Socket(request, ws)
    runtime.sockets.add(ws)  # a drain closes it with 1001 (going away)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await socket.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await socket.send_error(None, ApiError(400, "send JSON as text frames", code="binary_frame"))
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        runtime.sockets.discard(ws)
        await socket.close()
    return ws
