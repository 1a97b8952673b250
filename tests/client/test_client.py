"""The async client SDK against a real mace server (the tiny random model) on a loopback port.

The tiny model's output is arbitrary, so these tests check structure: streamed deltas add up to the
non-streamed text of the same greedy request, usage adds up, errors are typed, and early exits make
the server abort (its `mace:num_requests_running` gauge returns to 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mace.client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChatResult,
    ChatStream,
    CompletionResult,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from mace.client.errors import status_error
from mace.client.sse import SSEDecoder
from mace.config import load_config
from mace.server.app import create_app
from tests.conftest import serve_app

ROOT = Path(__file__).resolve().parents[2]
MODEL = "builtin:tiny"
MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}
LONG = 900  # tokens: far more than any test waits for; those requests are aborted early


# ---- fixtures and helpers ----


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def server_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("client")
    config = load_config(
        ROOT / "configs" / "tiny.toml", {"cache_dir": str(tmp / "cache"), "data_dir": str(tmp / "data")}, environ={}
    )
    runner, url = await serve_app(create_app(config))
    try:
        async with AsyncClient(url, timeout_s=5.0) as probe:
            await wait_for(probe.ready, "GET /ready to answer 200", timeout_s=60.0)
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(server_url: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server_url, timeout_s=30.0) as client:
        yield client
        # Every test must leave the server idle: nothing running or waiting.
        await wait_for(lambda: idle(client), "the server to be idle after the test")


async def gauge(client: AsyncClient, name: str) -> float:
    for line in (await client.metrics()).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


async def counter(client: AsyncClient, sample: str) -> float:
    for line in (await client.metrics()).splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


async def running(client: AsyncClient) -> float:
    return await gauge(client, "mace:num_requests_running")


async def idle(client: AsyncClient) -> bool:
    return await running(client) == 0 and await gauge(client, "mace:num_requests_waiting") == 0


async def not_running(client: AsyncClient) -> bool:
    return await running(client) == 0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def check_result(result: ChatResult | CompletionResult, max_tokens: int) -> None:
    assert result.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == max_tokens
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert 0 <= result.usage.cached_tokens < result.usage.prompt_tokens  # a repeated prefix is reused
    assert result.adapter_version == 0
    assert result.system_fingerprint == "mace-adapter-v0"
    assert result.model == MODEL


# ---- server state ----


async def test_health_ready_models(client: AsyncClient) -> None:
    assert await client.health() == {"status": "ok"}
    assert await client.ready() is True
    models = await client.models()
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len is not None and models[0].max_model_len > 0
    assert client.model is None  # not fetched until a request needs it
    await client.chat(MESSAGES, max_tokens=1)
    assert client.model == MODEL


async def test_base_url_with_v1_suffix(server_url: str) -> None:
    async with AsyncClient(server_url + "/v1/", model=MODEL) as client:
        assert await client.ready()
        assert (await client.chat(MESSAGES, max_tokens=2, **GREEDY)).usage is not None


# ---- chat and completions ----


async def test_chat_stream_matches_non_stream(client: AsyncClient) -> None:
    result = await client.chat(MESSAGES, max_tokens=12, **GREEDY)
    check_result(result, 12)
    assert result.request_id.startswith("chatcmpl-")

    stream = client.chat(MESSAGES, stream=True, max_tokens=12, **GREEDY)
    assert isinstance(stream, ChatStream)
    deltas = []
    async with stream:
        async for text in stream:
            assert isinstance(text, str) and text
            deltas.append(text)
    assert "".join(deltas) == result.text
    streamed = stream.result
    check_result(streamed, 12)
    assert streamed.text == result.text
    assert result.usage is not None  # the same prompt just ran: all of it but the last token is cached
    assert streamed.usage == dataclasses.replace(result.usage, cached_tokens=result.usage.prompt_tokens - 1)
    assert streamed.request_id.startswith("chatcmpl-") and streamed.request_id == stream.request_id
    assert streamed.request_id != result.request_id


async def test_stream_without_context_manager_and_awaited(client: AsyncClient) -> None:
    reference = await client.chat(MESSAGES, max_tokens=6, **GREEDY)
    stream = client.chat(MESSAGES, stream=True, max_tokens=6, **GREEDY)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.result
    assert "".join([text async for text in stream]) == reference.text
    assert stream.result.finish_reason == "length"

    awaited = await client.chat(MESSAGES, stream=True, max_tokens=6, **GREEDY)  # sends the request now
    assert awaited.request_id is not None
    assert "".join([text async for text in awaited]) == reference.text


async def test_complete_stream_matches_non_stream(client: AsyncClient) -> None:
    for prompt in ("Once upon a time", [72, 101, 108, 108, 111]):
        result = await client.complete(prompt, max_tokens=10, **GREEDY)
        assert isinstance(result, CompletionResult)
        check_result(result, 10)
        assert result.request_id.startswith("cmpl-")
        stream = client.complete(prompt, stream=True, max_tokens=10, **GREEDY)
        async with stream:
            deltas = [text async for text in stream]
        assert "".join(deltas) == result.text == stream.result.text
        check_result(stream.result, 10)
        # The same prompt just ran: all of it but the last token, which must run for the logits, is cached.
        usage = result.usage
        assert usage is not None
        assert stream.result.usage == dataclasses.replace(usage, cached_tokens=usage.prompt_tokens - 1)


async def test_stream_flag_given_as_a_bool(client: AsyncClient) -> None:
    flag = False  # typed `bool`, not a literal: the overload returns a union
    result = await client.chat(MESSAGES, flag, max_tokens=3, **GREEDY)
    assert isinstance(result, ChatResult)
    assert result.usage is not None and result.usage.completion_tokens == 3


# ---- errors ----


async def test_bad_request_names_the_param(client: AsyncClient) -> None:
    with pytest.raises(BadRequestError) as caught:
        await client.chat(MESSAGES, max_tokens=0)
    error = caught.value
    assert error.status == 400
    assert error.param == "max_tokens"
    assert error.type == "invalid_request_error"
    assert error.code == "invalid_value"
    assert isinstance(error, APIStatusError)

    with pytest.raises(BadRequestError) as caught:  # a stream raises before its first delta
        async with client.chat(MESSAGES, stream=True, max_tokens=0):
            pass
    assert caught.value.param == "max_tokens"

    with pytest.raises(BadRequestError):
        await client.complete("hi", stream=True, max_tokens=0)


async def test_unknown_model_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.chat(MESSAGES, model="no-such-model", max_tokens=1)
    assert caught.value.status == 404
    assert caught.value.param == "model"
    assert caught.value.code == "model_not_found"
    with pytest.raises(NotFoundError):
        async for _ in client.complete("hi", stream=True, model="no-such-model", max_tokens=1):
            pass


async def test_unreachable_server() -> None:
    async with AsyncClient(f"http://127.0.0.1:{closed_port()}", timeout_s=5.0) as client:
        with pytest.raises(APIConnectionError) as caught:
            await client.chat(MESSAGES, max_tokens=1)  # fails fetching the model list
        assert not isinstance(caught.value, APITimeoutError)
        with pytest.raises(APIConnectionError):
            await client.chat(MESSAGES, model=MODEL, max_tokens=1)
        with pytest.raises(APIConnectionError):
            async for _ in client.chat(MESSAGES, stream=True, model=MODEL):
                pass
        with pytest.raises(APIConnectionError):
            async with client.ws_chat():
                pass
        with pytest.raises(APIConnectionError):
            await client.health()
        assert await client.ready() is False


async def test_timeout_on_long_generation(server_url: str, client: AsyncClient) -> None:
    async with AsyncClient(server_url, timeout_s=0.05, model=MODEL) as impatient:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            await impatient.chat(MESSAGES, max_tokens=LONG, ignore_eos=True)
        assert time.monotonic() - started < 5.0
    # Giving up closed the connection: the server aborts the generation.
    await wait_for(lambda: not_running(client), "the timed-out request to be aborted")


async def test_status_errors_map_to_types() -> None:
    body = b'{"error": {"message": "busy", "type": "rate_limit_error", "param": null, "code": "queue_full"}}'
    error = status_error(429, body, {"Retry-After": "1"})
    assert isinstance(error, RateLimitError)
    assert (error.retry_after_s, error.code, error.message, error.param) == (1.0, "queue_full", "busy", None)
    unavailable = status_error(503, b'{"error": {"message": "not ready"}}', {"Retry-After": "5"})
    assert isinstance(unavailable, ServiceUnavailableError) and isinstance(unavailable, ServerError)
    assert unavailable.retry_after_s == 5.0
    assert type(status_error(500, b"<html>oops</html>", {})) is ServerError
    assert type(status_error(418, b"", {})) is APIStatusError
    assert isinstance(status_error(401, b"", {}), AuthenticationError)


# ---- early exits abort the generation on the server ----


async def test_breaking_out_of_a_stream_aborts_it(client: AsyncClient) -> None:
    aborted_before = await counter(client, 'mace:request_success_total{finished_reason="abort"}')
    async with client.chat(MESSAGES, stream=True, max_tokens=LONG, ignore_eos=True) as stream:
        async for _ in stream:
            assert await running(client) == 1
            break
    assert stream.result.finish_reason == "abort"
    assert stream.result.usage is None
    assert stream.result.text
    await wait_for(lambda: not_running(client), "mace:num_requests_running to return to 0")

    async def abort_counted() -> bool:
        count = await counter(client, 'mace:request_success_total{finished_reason="abort"}')
        return count == aborted_before + 1

    await wait_for(abort_counted, "the abort to be counted")


async def test_cancelling_the_consumer_aborts_the_stream(client: AsyncClient) -> None:
    stream = client.complete("Tell me", stream=True, max_tokens=LONG, ignore_eos=True)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.result.finish_reason == "abort"
    await wait_for(lambda: not_running(client), "mace:num_requests_running to return to 0")


async def test_closing_a_stream_from_another_task_ends_its_iteration(client: AsyncClient) -> None:
    stream = client.chat(MESSAGES, stream=True, max_tokens=LONG, ignore_eos=True)
    first = asyncio.Event()

    async def consume() -> int:
        count = 0
        async for _ in stream:
            count += 1
            first.set()
        return count

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    await stream.aclose()
    assert await asyncio.wait_for(task, 20) >= 1  # ended quietly, no error
    assert stream.result.finish_reason == "abort"
    await wait_for(lambda: not_running(client), "mace:num_requests_running to return to 0")


# ---- websocket ----


async def test_ws_two_concurrent_conversations(client: AsyncClient) -> None:
    reference = await client.chat(MESSAGES, max_tokens=8, **GREEDY)
    async with client.ws_chat() as session:
        first = session.chat(MESSAGES, max_tokens=8, **GREEDY)
        second = session.chat([{"role": "user", "content": "Another one"}], "second", max_tokens=12, **GREEDY)
        assert second.id == "second"

        async def collect(conversation: Any) -> list[str]:
            return [text async for text in conversation]

        first_deltas, second_deltas = await asyncio.gather(collect(first), collect(second))
        for conversation, deltas, max_tokens in ((first, first_deltas, 8), (second, second_deltas, 12)):
            result = conversation.result
            assert "".join(deltas) == result.text
            check_result(result, max_tokens)
            assert result.request_id == conversation.id
        assert first.result.text == reference.text  # the same greedy request over HTTP
        assert first.result.usage == reference.usage
        assert await session.ping() >= 0
        assert await session.cancel(first.id) is False  # already finished


async def test_ws_cancel_ends_one_conversation(client: AsyncClient) -> None:
    async with client.ws_chat() as session:
        long = session.chat(MESSAGES, max_tokens=LONG, ignore_eos=True)
        short = session.chat(MESSAGES, max_tokens=6, **GREEDY)
        await short.start()
        received = [await anext(long)]
        assert await session.cancel(long.id) is True
        received += [text async for text in long]  # only deltas that had arrived already
        assert long.result.finish_reason == "abort"
        assert long.result.usage is None
        assert long.result.text == "".join(received)
        assert await long.cancel() is False

        short_text = "".join([text async for text in short])
        check_result(short.result, 6)
        assert short.result.text == short_text
        await wait_for(lambda: not_running(client), "the cancelled conversation to be aborted")

        with pytest.raises(ValueError, match="cancelled"):
            session.chat(MESSAGES, conversation_id=long.id)
        again = session.chat(MESSAGES, conversation_id=short.id, max_tokens=2)  # a finished id is reusable
        async with again:
            again_text = "".join([text async for text in again])
        assert again.result.text == again_text
        assert again.result.usage is not None and 1 <= again.result.usage.completion_tokens <= 2
        await session.ping()


async def test_ws_leaving_a_conversation_early_cancels_it(client: AsyncClient) -> None:
    async with client.ws_chat() as session:
        conversation = session.chat(MESSAGES, max_tokens=LONG, ignore_eos=True)
        async with conversation:
            async for _ in conversation:
                break
        assert conversation.result.finish_reason == "abort"
        await wait_for(lambda: not_running(client), "the conversation to be aborted")

        never_sent = session.chat(MESSAGES, max_tokens=LONG)
        assert await never_sent.cancel() is True
        assert [text async for text in never_sent] == []
        assert never_sent.result.finish_reason == "abort"


async def test_ws_error_event_raises_stream_error(client: AsyncClient) -> None:
    async with client.ws_chat() as session:
        bad = session.chat(MESSAGES, max_tokens=0)
        with pytest.raises(StreamError) as caught:
            async for _ in bad:
                pass
        assert caught.value.param == "max_tokens"
        assert caught.value.type == "invalid_request_error"
        with pytest.raises(RuntimeError, match="failed"):
            _ = bad.result
        unknown = session.chat(MESSAGES, model="no-such-model", max_tokens=1)
        with pytest.raises(StreamError) as caught:
            await anext(unknown)
        assert caught.value.code == "model_not_found"
        ok = session.chat(MESSAGES, max_tokens=2, **GREEDY)  # the session still works
        _ = [text async for text in ok]
        check_result(ok.result, 2)


async def test_ws_close_fails_running_conversations(client: AsyncClient) -> None:
    async with client.ws_chat() as session:
        conversation = await session.chat(MESSAGES, max_tokens=LONG, ignore_eos=True)
        await anext(conversation)
    assert session.closed
    with pytest.raises(APIConnectionError):
        async for _ in conversation:
            pass
    with pytest.raises(APIConnectionError):
        session.chat(MESSAGES)
    await wait_for(lambda: not_running(client), "the socket's generation to be aborted")


# ---- against a fake server: what mace only does on engine failures or with auth in front ----


async def test_api_key_and_stream_error_event() -> None:
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = b'data: {"id": "c1", "model": "fake", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}\r\n\r\n'
        error = b'data: {"error": {"message": "engine failed", "type": "server_error", "code": "engine_error"}}'
        await response.write(chunk + error + b"\n\ndata: [DONE]\n\n")
        return response

    async def ws(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no"}}, status=401)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/ws", ws)
    runner, url = await serve_app(app)
    try:
        async with AsyncClient(url, api_key="secret") as client:
            stream = client.chat(MESSAGES, stream=True)
            deltas = []
            with pytest.raises(StreamError) as caught:
                async for text in stream:
                    deltas.append(text)
            assert deltas == ["Hi"] and stream.text == "Hi"
            assert (caught.value.code, caught.value.message, caught.value.type) == (
                "engine_error", "engine failed", "server_error"
            )
            assert client.model == "fake"
            assert seen == ["Bearer secret", "Bearer secret"]
            with pytest.raises(AuthenticationError):
                async with client.ws_chat():
                    pass
    finally:
        await runner.cleanup()


# ---- SSE framing ----


def test_sse_decoder_framing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: {\"a\"") == []
    assert decoder.feed(b": 1}\r") == []
    assert decoder.feed(b"\n\r\n") == ['{"a": 1}']
    assert decoder.feed(b": a comment\nevent: x\ndata: line1\ndata:line2\n\n") == ["line1\nline2"]
    assert decoder.feed("data: é".encode()[:-1]) == []
    assert decoder.feed("é".encode()[-1:] + b"\n\ndata: [DONE]") == ["é"]
    assert decoder.flush() == ["[DONE]"]
    assert decoder.flush() == []
