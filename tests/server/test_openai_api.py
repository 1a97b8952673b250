"""The OpenAI-compatible API, through the official `openai` SDK and raw SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.conftest import RunningServer

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    yield sdk
    await sdk.close()


async def test_sdk_chat_non_streaming(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="builtin:tiny", messages=MESSAGES, max_tokens=8, temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    assert reply.system_fingerprint == "mace-adapter-v0"


async def test_sdk_streaming_equals_non_streaming(client: AsyncOpenAI) -> None:
    kwargs = {"model": "builtin:tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    finish_reasons: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(parts) == whole.choices[0].message.content
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_sdk_completions_and_models(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["builtin:tiny"]
    reply = await client.completions.create(model="builtin:tiny", prompt="abc", max_tokens=5, temperature=0)
    streamed = await client.completions.create(
        model="builtin:tiny", prompt="abc", max_tokens=5, temperature=0, stream=True
    )
    text = "".join([chunk.choices[0].text async for chunk in streamed if chunk.choices])
    assert text == reply.choices[0].text


async def test_sdk_reports_bad_request(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="builtin:tiny", messages=MESSAGES, max_tokens=0)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]


async def test_seeded_sampling_repeats(client: AsyncOpenAI) -> None:
    kwargs = {"model": "builtin:tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7,
              "top_p": 0.9}
    first = await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_stop_string_ends_generation(server: RunningServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "builtin:tiny", "prompt": "x", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    async with http.post(f"{server.url}/v1/completions", json=body) as response:
        full = (await response.json())["choices"][0]["text"]
    stop = full[5:7]
    assert stop, "the tiny model produced too little text for this test"
    async with http.post(f"{server.url}/v1/completions", json={**body, "stop": [stop]}) as response:
        reply = await response.json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]
