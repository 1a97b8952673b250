"""Websocket chat at /v1/ws: several conversations multiplexed on one socket by `id`.

Client -> server: {"type": "chat", "id", "messages", ...same fields as chat completions, `user` included}
                  {"type": "feedback", "id", "samples": one sample or a list, as POST /v1/feedback}
                  {"type": "cancel", "id"}   {"type": "ping"}
Server -> client: {"type": "delta", "id", "text"}
                  {"type": "done", "id", "finish_reason", "usage", "adapter_version", "system_fingerprint"}
                  {"type": "feedback_accepted", "id", "ids", "training": "on" | "off"}
                  {"type": "error", "id", "status", "error": {message, type, param, code}, "retry_after_s"?}
                  {"type": "pong"}
See docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import orjson
import structlog
from aiohttp import WSMsgType, web

from mace.server.auth import GUARD, PRINCIPAL, Guard, resolve_tenant
from mace.server.errors import ApiError
from mace.server.feedback_api import store_feedback, training_state
from mace.server.generation import PreparedRequest, generate, prepare_chat
from mace.server.keys import RUNTIME
from mace.server.limits import TokenBucket
from mace.server.openai_api import fingerprint, parse_body, usage
from mace.server.protocol import ChatCompletionRequest

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()
MAX_CONVERSATIONS_PER_SOCKET = 16


class _Socket:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.feedback: dict[str, asyncio.Task[None]] = {}  # journal writes not yet acknowledged, by message id
        self.principal = request[PRINCIPAL]
        rate = request.app[RUNTIME].config.server.ws_messages_per_s
        self.messages = TokenBucket(rate, 2 * rate)

    async def send(self, payload: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(orjson.dumps(payload).decode())

    async def send_error(self, conversation_id: Any, error: ApiError) -> None:
        # The status and retry delay that HTTP puts in the status line and Retry-After header.
        message = {"type": "error", "id": conversation_id, "status": error.status, **error.body()}
        if error.retry_after_s is not None:
            message["retry_after_s"] = error.retry_after_s
        await self.send(message)

    async def handle(self, data: str) -> None:
        wait_s = self.messages.take()
        if wait_s > 0:  # the message is dropped; a client that keeps flooding only gets these errors back
            await self.send_error(None, ApiError(
                429, f"too many messages on this socket; slow down for {wait_s:.2f}s", code="rate_limit_exceeded",
                retry_after_s=math.ceil(wait_s)))
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
        elif kind == "feedback":
            await self._start_feedback(conversation_id, message)
        else:
            await self.send_error(
                conversation_id, ApiError(400, "type must be one of chat, feedback, cancel, ping", param="type")
            )

    async def _check_id(self, message_id: Any) -> bool:
        """A chat or feedback id must be a short string that no running conversation or pending feedback
        of this socket uses, so that every answer names one message."""
        if not isinstance(message_id, str) or not message_id or len(message_id) > 128:
            await self.send_error(message_id, ApiError(400, "id must be a non-empty string", param="id"))
            return False
        if message_id in self.tasks or message_id in self.feedback:
            await self.send_error(message_id, ApiError(400, "this id is already in use", param="id"))
            return False
        return True

    async def _start_chat(self, conversation_id: Any, message: dict[str, Any]) -> None:
        if not await self._check_id(conversation_id):
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
        try:  # the order of POST /v1/chat/completions: rate, body, tenant, the key's streams, then admission
            guard.count_request(self.principal)
            body = parse_body(ChatCompletionRequest, fields)
            tenant = resolve_tenant(self.principal, body.user)
            guard.start_stream(self.principal)
        except ApiError as exc:
            await self.send_error(conversation_id, exc)
            return
        try:
            prepared = prepare_chat(runtime, body, tenant)
        except ApiError as exc:
            guard.end_stream(self.principal)
            await self.send_error(conversation_id, exc)
            return
        task = asyncio.create_task(self._run_chat(conversation_id, prepared))
        task.add_done_callback(lambda _: self._release(guard, prepared))
        self.tasks[conversation_id] = task
        task.add_done_callback(lambda done: self._forget(conversation_id, done))

    async def _start_feedback(self, feedback_id: Any, message: dict[str, Any]) -> None:
        """The checks POST /v1/feedback passes in the middleware (shutdown, scope, request rate), then the
        shared write in a task of its own: a slow journal must not hold up this socket's other messages."""
        if not await self._check_id(feedback_id):
            return
        try:
            self.request.app[RUNTIME].check_open()
            if not self.principal.allows("train"):
                raise ApiError(403, "this API key lacks the 'train' scope needed for feedback",
                               code="insufficient_scope")
            self.request.app[GUARD].count_request(self.principal)
            if "samples" not in message:
                raise ApiError(400, "samples is required: one feedback sample or a list", param="samples")
        except ApiError as exc:
            await self.send_error(feedback_id, exc)
            return
        task = asyncio.create_task(self._store_feedback(feedback_id, message["samples"]))
        self.feedback[feedback_id] = task
        task.add_done_callback(lambda _: self.feedback.pop(feedback_id, None))

    async def _store_feedback(self, feedback_id: str, samples: Any) -> None:
        runtime = self.request.app[RUNTIME]
        with runtime.in_flight(), contextlib.suppress(ConnectionResetError):
            try:
                ids = await store_feedback(runtime, self.request.app[GUARD], self.principal, samples)
            except ApiError as exc:
                await self.send_error(feedback_id, exc)
                return
            except Exception:  # never leave the client waiting for an answer
                log.exception("websocket feedback failed")
                await self.send_error(feedback_id, ApiError(500, "internal server error", code="internal_error"))
                return
            await self.send({"type": "feedback_accepted", "id": feedback_id, "ids": ids,
                             "training": training_state(self.request.app[RUNTIME])})

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

    def _release(self, guard: Guard, prepared: PreparedRequest) -> None:
        """A conversation's places are given back when its task ends, however it ends."""
        guard.end_stream(self.principal)
        prepared.admission.release()

    def _forget(self, conversation_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(conversation_id) is task:
            del self.tasks[conversation_id]

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        # Feedback writes are not cancelled: one under way completes (its samples are stored either way),
        # and the server-wide cap on pending writes stays true.
        await asyncio.gather(*tasks, *self.feedback.values(), return_exceptions=True)


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
