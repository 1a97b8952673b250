"""`AsyncClient`: the asynchronous SDK of a mace server (OpenAI-compatible HTTP API and /v1/ws)."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, TypeVar, overload

import aiohttp
import orjson

from mace.client.errors import APIConnectionError, MaceError, status_error, translated
from mace.client.retry import RetryPolicy
from mace.client.streams import ChatStream, CompletionStream, Opener, ResultT
from mace.client.transport import HttpTransport, loads_json
from mace.client.types import (
    AdapterList,
    ChatResult,
    CompletionResult,
    FeedbackCounts,
    FeedbackSample,
    Message,
    ModelInfo,
    Usage,
    acknowledged_ids,
    adapter_version_of,
    feedback_payload,
)
from mace.client.ws import WsChatSession, ws_connect

Messages = Sequence[Message | Mapping[str, Any]]
Prompt = str | Sequence[int]
T = TypeVar("T")
Samples = FeedbackSample | Mapping[str, Any] | Sequence[FeedbackSample | Mapping[str, Any]]


class AsyncClient(HttpTransport):
    """Client of one mace server.

        async with AsyncClient("http://127.0.0.1:8000") as client:
            result = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
            async with client.chat(messages, stream=True) as stream:
                async for text in stream: ...

    `**params` of chat()/complete() go into the request body as they are (max_tokens, temperature,
    top_p, top_k, seed, stop, ignore_eos, model, user, ...); None values are left out. Without a `model`
    there or in the constructor, the first model of GET /v1/models is used (fetched once).

    Tenants: `user="U"` (OpenAI's field) on chat(), complete(), ws chat and the feedback calls acts for
    that end user, so their own adapter lineage answers and learns; it needs a key with the
    `act_for_users` scope (403 otherwise). `adapters()` and `activate()` take `tenant=` or `user=` to
    name a lineage other than the key's own ("" is the shared one).

    `timeout_s` bounds each non-streamed request as a whole; for streams and websocket
    conversations it bounds the wait for each next piece of data, so a long generation can stream
    for as long as it keeps producing. Timeouts raise `APITimeoutError`.

    Learning: `feedback()` sends training samples (`correct(result, answer)` the answer a result should
    have had), `feedback_counts()` reads the journal, `adapters()` and `activate(version)` list and switch
    adapter versions. These calls repeat a 429 or 503 that carries Retry-After, up to `max_retries` times
    and only for waits up to `max_retry_wait_s` (see mace.client.retry); generation is never repeated.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        model: str | None = None,
        max_retries: int = 2,
        max_retry_wait_s: float = 10.0,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, RetryPolicy(max_retries, max_retry_wait_s))
        self._model = model
        self._model_lock = asyncio.Lock()

    @property
    def model(self) -> str | None:
        """The model requests use by default: given, or fetched from /v1/models on first need."""
        return self._model

    # ---- server state ----

    async def health(self) -> dict[str, Any]:
        """GET /health: {"status": "ok"} while the process is up."""
        body = await self._get_json("/health")
        return body if isinstance(body, dict) else {"status": body}

    async def ready(self) -> bool:
        """GET /ready: True once the model is loaded. False while the server answers 503 or cannot be
        reached (so it can be polled while the server starts); other errors raise."""
        try:
            status, headers, body = await self._request("GET", "/ready")
        except APIConnectionError:  # timeouts included
            return False
        if status == 200:
            return True
        if status == 503:
            return False
        raise status_error(status, body, headers)

    async def models(self) -> list[ModelInfo]:
        """GET /v1/models."""
        body = await self._get_json("/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise MaceError(f"unexpected /v1/models answer: {body!r}")
        return [ModelInfo.from_payload(item) for item in data]

    async def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        status, headers, body = await self._request("GET", "/metrics")
        if status >= 400:
            raise status_error(status, body, headers)
        return body.decode("utf-8", "replace")

    # ---- generation ----

    @overload
    def chat(
        self, messages: Messages, stream: Literal[False] = False, **params: Any
    ) -> Coroutine[Any, Any, ChatResult]: ...

    @overload
    def chat(self, messages: Messages, stream: Literal[True], **params: Any) -> ChatStream: ...

    @overload
    def chat(
        self, messages: Messages, stream: bool, **params: Any
    ) -> Coroutine[Any, Any, ChatResult] | ChatStream: ...

    def chat(
        self, messages: Messages, stream: bool = False, **params: Any
    ) -> Coroutine[Any, Any, ChatResult] | ChatStream:
        """POST /v1/chat/completions. `await client.chat(...)` gives a ChatResult;
        `client.chat(..., stream=True)` gives a ChatStream (see GenerationStream)."""
        body = {"messages": [dict(m) for m in messages], **_without_none(params)}
        if stream:
            return ChatStream(self._stream_opener("/v1/chat/completions", body), messages=body["messages"])
        return self._generate("/v1/chat/completions", body, ChatResult)

    @overload
    def complete(
        self, prompt: Prompt, stream: Literal[False] = False, **params: Any
    ) -> Coroutine[Any, Any, CompletionResult]: ...

    @overload
    def complete(self, prompt: Prompt, stream: Literal[True], **params: Any) -> CompletionStream: ...

    @overload
    def complete(
        self, prompt: Prompt, stream: bool, **params: Any
    ) -> Coroutine[Any, Any, CompletionResult] | CompletionStream: ...

    def complete(
        self, prompt: Prompt, stream: bool = False, **params: Any
    ) -> Coroutine[Any, Any, CompletionResult] | CompletionStream:
        """POST /v1/completions with a text prompt or a list of token ids; like chat()."""
        body = {"prompt": prompt if isinstance(prompt, str) else list(prompt), **_without_none(params)}
        if stream:
            return CompletionStream(self._stream_opener("/v1/completions", body))
        return self._generate("/v1/completions", body, CompletionResult)

    # ---- learning ----

    async def feedback(self, samples: Samples, user: str | None = None) -> list[int]:
        """POST /v1/feedback: one sample or a list (see FeedbackSample), `user` on those that name none.
        Returns the journal ids of the samples, once the server has stored them durably. Needs the `train`
        scope."""
        body = feedback_payload(samples, user)
        ids = acknowledged_ids(await self._json("POST", "/v1/feedback", body))
        if ids is None:
            raise MaceError("POST /v1/feedback answered without the ids of the stored samples")
        return ids

    async def correct(
        self, result: ChatResult, answer: str, weight: float | None = None, user: str | None = None
    ) -> list[int]:
        """Send `answer` as what `result` should have said (same conversation, linked by request id)."""
        return await self.feedback(result.correction(answer, weight=weight, user=user))

    async def feedback_counts(self) -> FeedbackCounts:
        """GET /v1/feedback: how many samples the journal holds, trained, pending and held out."""
        return _parsed(FeedbackCounts.from_payload, await self._json("GET", "/v1/feedback"), "/v1/feedback")

    async def adapters(self, tenant: str | None = None, user: str | None = None) -> AdapterList:
        """GET /v1/adapters: a lineage's adapter versions with their held-out losses, and which one serves;
        the key's own lineage unless `tenant` or `user` names another."""
        path = "/v1/adapters" + _lineage_query(tenant, user)
        return _parsed(AdapterList.from_payload, await self._json("GET", path), path)

    async def activate(self, version: int, tenant: str | None = None, user: str | None = None) -> int:
        """POST /v1/adapters/{version}/activate: new requests of that lineage (the key's own unless `tenant`
        or `user` names another) use that version (0 is the base model); returns the active version.
        Activating an older one holds automatic publishing until the newest is activated again. Needs the
        `train` scope and the lineage's ownership, or `admin` (always for the shared lineage); an unknown
        version raises NotFoundError."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError("version must be a non-negative integer")
        path = f"/v1/adapters/{version}/activate" + _lineage_query(tenant, user)
        payload = await self._json("POST", path)
        active = payload.get("active") if isinstance(payload, dict) else None
        if not isinstance(active, int) or isinstance(active, bool):
            raise MaceError(f"unexpected {path} answer: {payload!r}")
        return active

    def ws_chat(self) -> AbstractAsyncContextManager[WsChatSession]:
        """A websocket session on /v1/ws for several concurrent conversations:

            async with client.ws_chat() as session:
                conversation = session.chat(messages, max_tokens=32)
                async for text in conversation: ...
                conversation.result
        """
        return self._ws_chat()

    @asynccontextmanager
    async def _ws_chat(self) -> AsyncIterator[WsChatSession]:
        model = await self._resolve_model()
        ws = await ws_connect(self._http(), self._url("/v1/ws"), self._headers(), self.timeout_s)
        session = WsChatSession(ws, model, self.timeout_s, self.retry)
        try:
            yield session
        finally:
            await session.close()

    # ---- internals ----

    async def _generate(self, path: str, body: dict[str, Any], result_type: type[ResultT]) -> ResultT:
        body = {**body, "model": await self._model_for(body), "stream": False}
        status, headers, raw = await self._request("POST", path, body)
        if status >= 400:
            raise status_error(status, raw, headers)
        payload = loads_json(raw, path)
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise MaceError(f"unexpected {path} answer without choices: {payload!r}")
        choice = choices[0]
        extra: dict[str, Any] = {}
        if issubclass(result_type, ChatResult):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            extra["messages"] = tuple(body["messages"])
        else:
            text = choice.get("text")
        fingerprint = payload.get("system_fingerprint")
        fingerprint = fingerprint if isinstance(fingerprint, str) else None
        return result_type(
            text=text if isinstance(text, str) else "",
            finish_reason=str(choice.get("finish_reason")),
            usage=Usage.from_payload(payload.get("usage")),
            adapter_version=adapter_version_of(fingerprint),
            request_id=str(payload.get("id", "")),
            model=str(payload.get("model", body["model"])),
            system_fingerprint=fingerprint,
            **extra,
        )

    def _stream_opener(self, path: str, body: dict[str, Any]) -> Opener:
        async def open_stream() -> tuple[aiohttp.ClientResponse, str]:
            model = await self._model_for(body)
            options = body.get("stream_options")
            stream_options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            request = {**body, "model": model, "stream": True, "stream_options": stream_options}
            # The whole stream may take long; bound the connect and each wait for data instead.
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s)
            with translated(f"POST {path}"):
                response = await self._http().post(
                    self._url(path), data=orjson.dumps(request), headers=self._headers(json=True),
                    timeout=timeout,
                )
            if response.status >= 400:
                try:
                    with translated(f"POST {path}"):
                        raw = await response.read()
                finally:
                    response.release()
                raise status_error(response.status, raw, response.headers)
            return response, model

        return open_stream

    async def _model_for(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) else await self._resolve_model()

    async def _resolve_model(self) -> str:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    models = await self.models()
                    if not models:
                        raise MaceError("the server lists no models")
                    self._model = models[0].id
        return self._model

def _lineage_query(tenant: str | None, user: str | None) -> str:
    query = _without_none({"tenant": tenant, "user": user})
    return "?" + urllib.parse.urlencode(query) if query else ""


def _without_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}


def _parsed(parse: Callable[[Any], T], payload: Any, path: str) -> T:
    try:
        return parse(payload)
    except ValueError as exc:
        raise MaceError(f"unexpected {path} answer: {exc}") from None
