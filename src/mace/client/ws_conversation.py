"""One chat on a websocket session (`WsChatSession.chat`): the deltas as they arrive, then its result.

The session's read loop puts each message for this conversation in its queue; iterating the
conversation takes them out. Cancelling and timeouts go through the session, which owns the socket.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from mace.client.errors import APITimeoutError, MaceError, StreamError
from mace.client.types import ChatResult, Usage, adapter_version_of

if TYPE_CHECKING:
    from mace.client.ws import WsChatSession

ConversationState = Literal["new", "open", "done", "aborted", "failed"]
Event = dict[str, Any] | MaceError


class WsConversation:
    """One chat on a WsChatSession. Iterate it for the text deltas; afterwards `result` is a
    ChatResult (its request_id is the conversation id). The chat message is sent on the first
    `await`, iteration or `async with`. An error event for it raises StreamError from the iteration.
    """

    def __init__(self, session: WsChatSession, conversation_id: str, message: dict[str, Any]) -> None:
        self.id = conversation_id
        self._session = session
        self._message = message
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._state: ConversationState = "new"
        self._parts: list[str] = []
        self._unread: deque[str] = deque()  # deltas that had arrived when the conversation was cancelled
        self._done: dict[str, Any] | None = None
        self._error: BaseException | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self._state in ("done", "aborted", "failed")

    @property
    def result(self) -> ChatResult:
        if self._state == "done":
            assert self._done is not None
            fingerprint = self._done.get("system_fingerprint")
            fingerprint = fingerprint if isinstance(fingerprint, str) else None
            version = self._done.get("adapter_version")
            return self._build(
                str(self._done.get("finish_reason")),
                Usage.from_payload(self._done.get("usage")),
                version if isinstance(version, int) else adapter_version_of(fingerprint),
                fingerprint,
            )
        if self._state == "aborted":
            return self._build("abort", None, None, None)
        if self._state == "failed":
            raise RuntimeError(f"the conversation failed ({self._error!r})") from self._error
        raise RuntimeError("the conversation has not finished: iterate it to the end (or cancel it) first")

    async def start(self) -> Self:
        """Send the chat message (once)."""
        if self._state == "new":
            self._state = "open"
            try:
                await self._session._send(self._message)
            except MaceError as exc:
                self._session._forget(self.id)
                self._end("failed", exc)
                raise
        return self

    async def cancel(self) -> bool:
        return await self._session.cancel(self.id)

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.finished:
            await self.cancel()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self._unread:
            return self._unread.popleft()
        while not self.finished:
            await self.start()
            if self.finished:
                break
            event = await self._next_event()
            if isinstance(event, MaceError):
                self._end("failed", event)
                raise event
            elif event.get("type") == "delta":
                text = event.get("text")
                if isinstance(text, str) and text:
                    self._parts.append(text)
                    return text
            elif event.get("type") == "done":
                self._done = event
                self._end("done")
            else:
                error = StreamError.from_payload(event.get("error"))
                self._end("failed", error)
                raise error
        raise StopAsyncIteration

    async def _next_event(self) -> Event:
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout(self._session.timeout_s):
                return await self._queue.get()
        except TimeoutError:
            pass
        await self._session._retire(self.id, send_cancel=True)
        error = APITimeoutError(f"conversation {self.id!r}: no message within {self._session.timeout_s}s")
        self._end("failed", error)
        raise error

    def _abort(self) -> None:
        """Cancelled: the deltas already queued count as received, and are still yielded."""
        while not self._queue.empty():
            event = self._queue.get_nowait()
            text = event.get("text") if isinstance(event, dict) and event.get("type") == "delta" else None
            if isinstance(text, str) and text:
                self._parts.append(text)
                self._unread.append(text)
        self._end("aborted")

    def _end(self, state: ConversationState, error: BaseException | None = None) -> None:
        if not self.finished:
            self._state = state
            self._error = error

    def _build(
        self, finish_reason: str, usage: Usage | None, adapter_version: int | None, fingerprint: str | None
    ) -> ChatResult:
        return ChatResult(
            text=self.text,
            finish_reason=finish_reason,
            usage=usage,
            adapter_version=adapter_version,
            request_id=self.id,
            model=str(self._message.get("model", "")),
            system_fingerprint=fingerprint,
            messages=tuple(self._message["messages"]),
        )
