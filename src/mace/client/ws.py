"""Websocket chat on /v1/ws: several conversations multiplexed on one socket by conversation id.

One background task reads the socket and routes each message to its conversation's queue (deltas,
done, error) or to the waiting ping (pong).

Cancelling: `await session.cancel(id)` (or `conversation.cancel()`, or leaving a conversation's
`async with` block early) tells the server to stop and ends the conversation locally at once (the
server sends nothing for a cancelled conversation): `result` is available right away, with
finish_reason "abort", usage None and the text of the deltas that had arrived; the iterator still
yields those it had not yet yielded, then stops. Messages that arrive for it later are dropped, and
its id cannot be reused on this session (they would be taken for the new conversation's). A
conversation whose "done" (or error) had already arrived is not cancelled: cancel() returns False.

Feedback: `await session.feedback(samples)` (or `session.correct(result, answer)`) sends a feedback
message and waits for its acknowledgement, so an app corrects an answer on the socket it already holds;
errors are the same typed errors as over HTTP (403 without the `train` scope, 429, 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import aiohttp
import orjson

from mace.client.closing import AsyncClosing
from mace.client.errors import (
    APIConnectionError,
    APITimeoutError,
    MaceError,
    event_error,
    status_error,
    translated,
)
from mace.client.retry import RetryPolicy
from mace.client.types import (
    ChatResult,
    FeedbackSample,
    acknowledged_ids,
    feedback_payload,
)
from mace.client.ws_conversation import WsConversation

WebSocket = aiohttp.ClientWebSocketResponse[Literal[True]]


async def ws_connect(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str], timeout_s: float
) -> WebSocket:
    """Open the websocket; handshake failures raise the typed status errors."""
    try:
        with translated(f"GET {url} (websocket)"):
            async with asyncio.timeout(timeout_s):
                return await http.ws_connect(url, headers=dict(headers), max_msg_size=16 * 1024 * 1024)
    except APIConnectionError as exc:
        handshake = exc.__cause__
        if isinstance(handshake, aiohttp.WSServerHandshakeError) and handshake.status >= 400:
            headers = handshake.headers or {}
            raise status_error(handshake.status, handshake.message.encode(), headers) from None
        raise



class WsChatSession(AsyncClosing):
    """A websocket on /v1/ws; get one from `AsyncClient.ws_chat()`."""

    def __init__(self, ws: WebSocket, model: str, timeout_s: float, retry: RetryPolicy | None = None) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._ws = ws
        self._active: dict[str, WsConversation] = {}
        self._feedback: dict[str, asyncio.Future[list[int]]] = {}  # acknowledgements awaited, by message id
        self._retired: set[str] = set()
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._reader = asyncio.create_task(self._read_loop(), name="mace-ws-reader")

    @property
    def closed(self) -> bool:
        return self._closed

    def chat(
        self, messages: Sequence[Mapping[str, Any]], conversation_id: str | None = None, **params: Any
    ) -> WsConversation:
        """Start a conversation (sent on first use); `params` are the chat completion fields (`user`
        included)."""
        if self._closed:
            raise APIConnectionError("the websocket session is closed")
        conversation_id = conversation_id or uuid.uuid4().hex
        if conversation_id in self._active:
            raise ValueError(f"conversation {conversation_id!r} is still running on this session")
        if conversation_id in self._retired:
            raise ValueError(f"conversation id {conversation_id!r} was cancelled on this session")
        message: dict[str, Any] = {
            "model": self.model,
            **{key: value for key, value in params.items() if value is not None},
            "type": "chat",
            "id": conversation_id,
            "messages": [dict(m) for m in messages],
        }
        conversation = WsConversation(self, conversation_id, message)
        self._active[conversation_id] = conversation
        return conversation

    async def cancel(self, conversation_id: str) -> bool:
        """Stop a conversation (see the module's docstring); False if it was not running."""
        return await self._retire(conversation_id, send_cancel=True, abort=True)

    async def feedback(
        self, samples: FeedbackSample | Mapping[str, Any] | Sequence[FeedbackSample | Mapping[str, Any]],
        user: str | None = None,
    ) -> list[int]:
        """A feedback message: one sample or a list, as AsyncClient.feedback(); returns the journal ids
        once the server has stored them. A 429 or 503 with a retry delay is repeated as the client's
        retry policy allows."""
        payload = feedback_payload(samples, user)
        return await self.retry.run(lambda: self._send_feedback(payload))

    async def correct(
        self, result: ChatResult, answer: str, weight: float | None = None, user: str | None = None
    ) -> list[int]:
        """Send `answer` as what `result` (a conversation of this session or an HTTP chat) should have said."""
        return await self.feedback(result.correction(answer, weight=weight, user=user))

    async def _send_feedback(self, samples: list[dict[str, Any]]) -> list[int]:
        message_id = f"feedback-{uuid.uuid4().hex}"
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._feedback[message_id] = future
        try:
            await self._send({"type": "feedback", "id": message_id, "samples": samples})
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await future
            except TimeoutError:
                raise APITimeoutError(f"feedback {message_id!r}: no answer within {self.timeout_s}s") from None
        finally:
            self._feedback.pop(message_id, None)

    async def ping(self) -> float:
        """Send a ping and wait for the pong; returns the round trip in seconds."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)  # pongs come back in order: a late one consumes its own future
        started = time.perf_counter()
        try:
            await self._send({"type": "ping"})
        except BaseException:
            self._pongs.remove(future)
            raise
        try:
            async with asyncio.timeout(self.timeout_s):
                await future
        except TimeoutError:
            raise APITimeoutError(f"no pong within {self.timeout_s}s") from None
        return time.perf_counter() - started

    async def close(self) -> None:
        """Close the socket (the server then aborts this socket's generations); conversations still
        running raise APIConnectionError."""
        self._closed = True
        if not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if not self._ws.closed:
            await self._ws.close()

    # ---- internals ----

    async def _send(self, payload: dict[str, Any]) -> None:
        if self._closed or self._ws.closed:
            raise APIConnectionError("the websocket session is closed")
        with translated("websocket send"):
            async with self._send_lock:
                await self._ws.send_str(orjson.dumps(payload).decode())

    async def _retire(self, conversation_id: str, send_cancel: bool, abort: bool = False) -> bool:
        conversation = self._active.pop(conversation_id, None)
        if conversation is None:
            return False
        self._retired.add(conversation_id)
        never_sent = conversation._state == "new"
        if abort or never_sent:
            conversation._abort()
        if send_cancel and not never_sent and not self._closed and not self._ws.closed:
            # If the socket is gone, the server has aborted the generation already.
            with contextlib.suppress(APIConnectionError):
                await self._send({"type": "cancel", "id": conversation_id})
        return True

    def _forget(self, conversation_id: str) -> None:
        self._active.pop(conversation_id, None)

    async def _read_loop(self) -> None:
        ended: MaceError = APIConnectionError("the websocket closed")
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    ended = APIConnectionError(f"websocket error: {self._ws.exception()!r}")
                    break
        except asyncio.CancelledError:
            ended = APIConnectionError("the websocket session is closed")
            raise
        except Exception as exc:
            ended = APIConnectionError(f"websocket read failed: {type(exc).__name__}: {exc}")
        finally:
            self._closed = True
            for conversation_id in list(self._active):
                self._active.pop(conversation_id)._queue.put_nowait(APIConnectionError(str(ended)))
            while self._pongs:
                future = self._pongs.popleft()
                if not future.done():
                    future.set_exception(APIConnectionError(str(ended)))
            for waiting in self._feedback.values():
                if not waiting.done():
                    waiting.set_exception(APIConnectionError(str(ended)))

    def _dispatch(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "pong":
            if self._pongs:
                future = self._pongs.popleft()
                if not future.done():
                    future.set_result(None)
            return
        conversation_id = message.get("id")
        if isinstance(conversation_id, str) and conversation_id in self._feedback:
            _acknowledge(self._feedback.pop(conversation_id), message)
            return
        if kind not in ("delta", "done", "error") or not isinstance(conversation_id, str):
            return  # errors without an id answer malformed frames, which this SDK does not send
        conversation = self._active.get(conversation_id)
        if conversation is None:
            return  # cancelled (or unknown): drop
        if kind != "delta":
            del self._active[conversation_id]
        conversation._queue.put_nowait(message)


def _acknowledge(future: asyncio.Future[list[int]], message: dict[str, Any]) -> None:
    if future.done():
        return  # its caller gave up (timeout)
    ids = acknowledged_ids(message) if message.get("type") == "feedback_accepted" else None
    if ids is not None:
        future.set_result(ids)
    elif message.get("type") == "error":
        future.set_exception(event_error(message))
    else:
        future.set_exception(MaceError(f"unexpected answer to a feedback message: {message!r}"))
