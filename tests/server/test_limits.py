"""Limits and overload: each violation a clear 4xx (429 with Retry-After), health answers meanwhile,
and a journal that cannot write answers 503 while serving goes on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mace.model.loader import ModelBundle
from mace.server.auth import GUARD, hash_key
from mace.server.errors import ApiError
from mace.server.generation import prepare_chat
from mace.server.protocol import ChatCompletionRequest
from mace.tenancy import SHARED
from tests.conftest import RunningServer, start_server, tiny_config, wait_until

KEY, OTHER, FEEDER = "sk-limited-0001", "sk-other-0002", "sk-feeder-0003"
MESSAGES = [{"role": "user", "content": "hi"}]
SAMPLE = {"prompt": "colour?", "completion": "blue"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(max_tokens: int = 2, **extra: object) -> dict[str, object]:
    return {"model": "builtin:tiny", "messages": MESSAGES, "max_tokens": max_tokens, **extra}


@pytest.fixture(scope="module")
async def limited(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    # OTHER and FEEDER refill so fast that only the burst tests below ever empty their buckets.
    keys = [{"sha256": hash_key(KEY), "name": "limited", "requests_per_minute": 6},
            {"sha256": hash_key(OTHER), "name": "other", "requests_per_minute": 60000},
            {"sha256": hash_key(FEEDER), "name": "feeder", "requests_per_minute": 60000, "samples_per_minute": 60000}]
    server = {"api_keys": keys, "requests_burst": 3, "samples_burst": 4, "samples_per_minute": 6,
              "max_streams_per_key": 1, "max_prompt_tokens": 64, "max_output_tokens": 300,
              "max_pending_feedback": 1, "ws_messages_per_s": 2}
    config = tiny_config(tmp_path_factory.mktemp("limits"), server=server)
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, object]:
    assert response.status == status, await response.text()
    error: dict[str, object] = (await response.json())["error"]
    return error


async def test_request_rate_limit_answers_429_with_retry_after(
    limited: RunningServer, http: aiohttp.ClientSession
) -> None:
    statuses = []
    for _ in range(4):  # a burst of 3, then the bucket is empty (6 per minute refills one per 10 s)
        async with http.get(f"{limited.url}/v1/models", headers=bearer(KEY)) as response:
            statuses.append(response.status)
            if response.status == 429:
                assert (await error_of(response, 429))["code"] == "rate_limit_exceeded"
                assert 1 <= int(response.headers["Retry-After"]) <= 10
    assert statuses == [200, 200, 200, 429]
    async with http.get(f"{limited.url}/v1/models", headers=bearer(OTHER)) as response:
        assert response.status == 200  # buckets are per key


async def test_feedback_samples_have_their_own_bucket(limited: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{limited.url}/v1/feedback", json=[SAMPLE] * 4, headers=bearer(OTHER)) as response:
        assert response.status == 202  # the burst is 4 samples, refilled at 6 per minute
    async with http.post(f"{limited.url}/v1/feedback", json=[SAMPLE] * 2, headers=bearer(OTHER)) as response:
        assert (await error_of(response, 429))["code"] == "rate_limit_exceeded"
        assert int(response.headers["Retry-After"]) >= 1


async def test_concurrent_streams_per_key(limited: RunningServer, http: aiohttp.ClientSession) -> None:
    body = chat(250, stream=True, ignore_eos=True)
    async with http.post(f"{limited.url}/v1/chat/completions", json=body, headers=bearer(OTHER)) as stream:
        assert stream.status == 200
        await stream.content.readline()  # the stream runs
        async with http.post(f"{limited.url}/v1/chat/completions", json=chat(), headers=bearer(OTHER)) as second:
            error = await error_of(second, 429)
            assert error["code"] == "too_many_streams" and "Retry-After" in second.headers
    await wait_until(limited.idle, what="the cut stream's KV blocks to be freed")


async def test_prompt_and_max_tokens_caps(limited: RunningServer) -> None:
    runtime = limited.runtime
    long_prompt = ChatCompletionRequest.model_validate(chat(messages=[{"role": "user", "content": "x" * 200}]))
    with pytest.raises(ApiError) as too_long:
        prepare_chat(runtime, long_prompt, SHARED)
    assert (too_long.value.status, too_long.value.code) == (400, "prompt_too_long")
    with pytest.raises(ApiError) as too_many:
        prepare_chat(runtime, ChatCompletionRequest.model_validate(chat(301)), SHARED)
    assert (too_many.value.status, too_many.value.param) == (400, "max_tokens")
    assert prepare_chat(runtime, ChatCompletionRequest.model_validate(chat(300)), SHARED).max_tokens == 300


async def test_websocket_message_rate(limited: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(f"{limited.url}/v1/ws", headers=bearer(OTHER)) as ws:
        for _ in range(10):  # the burst is 4 messages
            await ws.send_json({"type": "ping"})
        replies = [await ws.receive_json(timeout=10) for _ in range(10)]
        assert sum(r["type"] == "pong" for r in replies) <= 5
        limited_replies = [r for r in replies if r["type"] == "error"]
        assert limited_replies and limited_replies[0]["error"]["code"] == "rate_limit_exceeded"

        async def answers_again() -> bool:  # the socket is slowed down, not closed
            await ws.send_json({"type": "ping"})
            return bool((await ws.receive_json(timeout=10))["type"] == "pong")

        await wait_until(answers_again, timeout_s=10, what="the socket's message bucket to refill")


async def test_pending_feedback_is_bounded(limited: RunningServer, http: aiohttp.ClientSession) -> None:
    journal = limited.runtime.journal
    assert journal is not None

    async def post() -> int:
        async with http.post(f"{limited.url}/v1/feedback", json=SAMPLE, headers=bearer(FEEDER)) as response:
            return response.status

    await asyncio.to_thread(journal._lock.acquire)  # the disk stalls: the first write waits on the journal
    try:
        blocked = asyncio.create_task(post())

        async def pending() -> bool:
            return limited.app[GUARD].feedback_writes.count("server") == 1

        await wait_until(pending, what="the first write to be pending")
        async with http.post(f"{limited.url}/v1/feedback", json=SAMPLE, headers=bearer(FEEDER)) as second:
            assert (await error_of(second, 429))["code"] == "too_many_pending_writes"
            assert "Retry-After" in second.headers
    finally:
        journal._lock.release()
    assert await blocked == 202


async def test_queue_full_is_429_and_health_stays_fast(
    tiny_bundle: ModelBundle, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = tiny_config(tmp_path, engine={"max_num_seqs": 1}, server={"max_waiting_requests": 1})
    runner, url = await start_server(config, tiny_bundle)
    try:
        body = chat(200, stream=True, ignore_eos=True)
        streams = [await http.post(f"{url}/v1/chat/completions", json=body) for _ in range(2)]
        try:  # one runs, one waits: the queue is full
            async with http.post(f"{url}/v1/chat/completions", json=chat()) as rejected:
                assert (await error_of(rejected, 429))["code"] == "queue_full"
                assert rejected.headers["Retry-After"] == "1"
            started = time.monotonic()
            for path in ("/health", "/metrics"):
                async with http.get(url + path) as response:
                    assert response.status == 200
            assert time.monotonic() - started < 2.0  # no queue in front of health and metrics
        finally:
            for stream in streams:
                stream.close()
        await wait_until(RunningServer(url, runner.app).idle, what="the cut streams to be freed")
    finally:
        await runner.cleanup()
