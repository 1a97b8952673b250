"""Streamed generations over HTTP (server-sent events): async iterators of text deltas with a `.result`."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import aiohttp
import orjson

from mace.client.errors import APIConnectionError, StreamError, translated
from mace.client.sse import SSEDecoder
from mace.client.types import ChatResult, CompletionResult, GenerationResult, Usage, adapter_version_of

ResultT = TypeVar("ResultT", bound=GenerationResult)
# Sends the request and returns the (successful, event-stream) response and the model it asked for;
# raises the SDK's typed errors otherwise.
Opener = Callable[[], Awaitable[tuple[aiohttp.ClientResponse, str]]]
_State = Literal["new", "open", "done", "aborted", "failed"]


class GenerationStream(Generic[ResultT]):
    """One streamed generation. Iterate it for the text deltas (str); afterwards `result` holds the
    whole generation. The request is sent on the first `await`, iteration or `async with`.

        async with client.chat(messages, stream=True, max_tokens=32) as stream:
            async for text in stream:
                print(text, end="")
        print(stream.result.usage)

    Leaving the `async with` block (or calling `aclose()`) before the end closes the HTTP response,
    which makes the server abort the generation; `result` then has finish_reason "abort" and the text
    received so far. Breaking out of a bare `async for` leaves the response open until `aclose()`.
    """

    _result_type: type[ResultT]

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._state: _State = "new"
        self._response: aiohttp.ClientResponse | None = None
        self._decoder = SSEDecoder()
        self._events: deque[str] = deque()
        self._parts: list[str] = []
        self._model = ""
        self._request_id: str | None = None
        self._fingerprint: str | None = None
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._error: BaseException | None = None

    # ---- what the caller sees ----

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def request_id(self) -> str | None:
        """The server's request id, once the response has begun."""
        return self._request_id

    @property
    def finished(self) -> bool:
        return self._state in ("done", "aborted", "failed")

    @property
    def result(self) -> ResultT:
        """The generation, once the stream has ended (fully, or early with finish_reason "abort")."""
        if self._state == "done":
            assert self._finish_reason is not None
            return self._build(self._finish_reason)
        if self._state == "aborted":
            return self._build("abort")
        if self._state == "failed":
            raise RuntimeError(f"the stream failed ({self._error!r}); it has no result") from self._error
        raise RuntimeError("the stream has not finished: iterate it to the end (or close it) first")

    async def aclose(self) -> None:
        """Close the response; if the generation was still running, the server aborts it."""
        if self._state in ("new", "open"):
            self._state = "aborted"
        self._close_response()

    close = aclose

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __await__(self) -> Generator[Any, None, Self]:
        """`stream = await client.chat(..., stream=True)` sends the request now, so that an error
        status raises here rather than at the first iteration."""
        return self._open_self().__await__()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self.finished:
            raise StopAsyncIteration
        try:
            await self._open()
            if self._state != "open":  # closed meanwhile
                raise StopAsyncIteration
            while True:
                while self._events:
                    text = self._on_event(self._events.popleft())
                    if self._saw_done():
                        self._close_response()
                        raise StopAsyncIteration
                    if text:
                        return text
                await self._read()
        except StopAsyncIteration:
            raise
        except BaseException as exc:  # CancelledError too: never leave the response open
            if self._state == "aborted" and not isinstance(exc, asyncio.CancelledError):
                raise StopAsyncIteration from None  # aclose() from elsewhere broke the read: just end
            self._fail(exc)
            raise

    # ---- internals ----

    async def _open_self(self) -> Self:
        await self._open()
        return self

    async def _open(self) -> None:
        if self._state != "new":
            return
        self._state = "open"
        try:
            response, model = await self._opener()
        except BaseException as exc:
            self._fail(exc)
            raise
        if self._state != "open":  # closed while the request was in flight
            response.close()
            return
        self._response, self._model = response, model
        self._request_id = response.headers.get("X-Request-Id")

    async def _read(self) -> None:
        assert self._response is not None
        with translated("reading the stream"):
            chunk = await self._response.content.readany()
        if chunk:
            self._events.extend(self._decoder.feed(chunk))
            return
        self._events.extend(self._decoder.flush())
        if not self._events:
            raise APIConnectionError("the stream ended before its final `data: [DONE]` event")

    def _saw_done(self) -> bool:
        return self._state == "done"

    def _on_event(self, data: str) -> str | None:
        """Record one event; return its text delta, if any."""
        if data == "[DONE]":
            if self._finish_reason is None:
                raise StreamError("the stream ended without a finish_reason", code="protocol_error")
            self._state = "done"
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StreamError(f"a stream event is not JSON: {data[:200]!r}", code="protocol_error") from exc
        if not isinstance(chunk, dict):
            raise StreamError(f"a stream event is not a JSON object: {data[:200]!r}", code="protocol_error")
        if "error" in chunk:
            raise StreamError.from_payload(chunk["error"])
        self._request_id = _str(chunk.get("id")) or self._request_id
        self._model = _str(chunk.get("model")) or self._model
        self._fingerprint = _str(chunk.get("system_fingerprint")) or self._fingerprint
        if chunk.get("usage") is not None:
            self._usage = Usage.from_payload(chunk["usage"]) or self._usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self._finish_reason = str(choice["finish_reason"])
        text = self._choice_text(choice)
        if text:
            self._parts.append(text)
        return text

    def _choice_text(self, choice: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def _build(self, finish_reason: str) -> ResultT:
        return self._result_type(
            text=self.text,
            finish_reason=finish_reason,
            usage=self._usage,
            adapter_version=adapter_version_of(self._fingerprint),
            request_id=self._request_id or "",
            model=self._model,
            system_fingerprint=self._fingerprint,
        )

    def _fail(self, exc: BaseException) -> None:
        if not self.finished:
            if isinstance(exc, asyncio.CancelledError):
                self._state = "aborted"  # the caller's task was cancelled: as if it had closed the stream
            else:
                self._state = "failed"
                self._error = exc
        self._close_response()

    def _close_response(self) -> None:
        if self._response is not None:
            # close(), not release(): an unfinished response must drop its connection, which is what
            # tells the server to abort the generation.
            if self._state == "done":
                self._response.release()
            else:
                self._response.close()
            self._response = None


class ChatStream(GenerationStream[ChatResult]):
    """A streamed chat completion: deltas are choices[0].delta.content."""

    _result_type = ChatResult

    def __init__(self, opener: Opener, messages: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(opener)
        self._messages = tuple(messages)

    def _build(self, finish_reason: str) -> ChatResult:
        return dataclasses.replace(super()._build(finish_reason), messages=self._messages)

    def _choice_text(self, choice: dict[str, Any]) -> str | None:
        delta = choice.get("delta")
        return _str(delta.get("content")) if isinstance(delta, dict) else None


class CompletionStream(GenerationStream[CompletionResult]):
    """A streamed text completion: deltas are choices[0].text."""

    _result_type = CompletionResult

    def _choice_text(self, choice: dict[str, Any]) -> str | None:
        return _str(choice.get("text"))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
