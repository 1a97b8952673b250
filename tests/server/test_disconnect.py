"""A client that goes away aborts its request and every KV block returns to the idle count."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import RunningServer, wait_until

LONG = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 900,
        "ignore_eos": True, "temperature": 0}


async def engine_busy(server: RunningServer) -> bool:
    engine = server.runtime.engine
    assert engine is not None
    return engine.core.blocks.num_used_blocks > 0


async def test_http_stream_disconnect_frees_kv(server: RunningServer) -> None:
    await wait_until(server.idle, what="idle before the test")
    for _ in range(3):
        session = aiohttp.ClientSession()
        response = await session.post(server.url + "/v1/chat/completions", json={**LONG, "stream": True})
        await response.content.readline()  # the stream has started
        assert await engine_busy(server)
        response.close()
        await session.close()
    await wait_until(server.idle, timeout_s=20, what="KV blocks back to idle after disconnects")


async def test_non_streaming_disconnect_frees_kv(server: RunningServer) -> None:
    await wait_until(server.idle, what="idle before the test")
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(server.url + "/v1/chat/completions", json=LONG))
        await wait_until(lambda: engine_busy(server), what="request running")
        task.cancel()
    await wait_until(server.idle, timeout_s=20, what="KV blocks back to idle after disconnect")


async def test_websocket_close_frees_kv(server: RunningServer) -> None:
    await wait_until(server.idle, what="idle before the test")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url + "/v1/ws")
        for conversation in ("a", "b"):
            await ws.send_json({"type": "chat", "id": conversation, **LONG})
        first = await ws.receive_json()
        assert first["type"] == "delta"
        await ws.close()
    await wait_until(server.idle, timeout_s=20, what="KV blocks back to idle after websocket close")
