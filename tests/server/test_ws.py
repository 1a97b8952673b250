"""The websocket chat protocol: multiplexed conversations, cancel, ping, and bad frames."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import RunningServer, wait_until

CHAT = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0}


async def collect(ws: aiohttp.ClientWebSocketResponse, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Read until every id in `ids` has a done or error message; returns text and final message per id."""
    result: dict[str, dict[str, Any]] = {i: {"text": ""} for i in ids}
    pending = set(ids)
    while pending:
        message = await ws.receive_json(timeout=30)
        conversation = message.get("id")
        if message["type"] == "delta":
            result[conversation]["text"] += message["text"]
        elif message["type"] in ("done", "error"):
            result[conversation]["final"] = message
            pending.discard(conversation)
    return result


async def test_two_conversations_on_one_socket(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_json({"type": "chat", "id": "one", **CHAT, "max_tokens": 6, "ignore_eos": True})
        await ws.send_json({"type": "chat", "id": "two", **CHAT, "max_tokens": 9, "ignore_eos": True})
        result = await collect(ws, {"one", "two"})
    assert result["one"]["final"]["usage"]["completion_tokens"] == 6
    assert result["two"]["final"]["usage"]["completion_tokens"] == 9
    assert result["one"]["final"]["finish_reason"] == "length"
    assert result["one"]["final"]["adapter_version"] == 0
    body = {"model": "builtin:tiny", **CHAT, "max_tokens": 6, "ignore_eos": True}
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        same = (await response.json())["choices"][0]["message"]["content"]
    assert result["one"]["text"] == same


async def test_cancel_ends_one_conversation(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_json({"type": "chat", "id": "long", **CHAT, "max_tokens": 900, "ignore_eos": True})
        await ws.send_json({"type": "chat", "id": "short", **CHAT, "max_tokens": 4, "ignore_eos": True})
        await ws.send_json({"type": "cancel", "id": "long"})
        result = await collect(ws, {"short"})
        assert result["short"]["final"]["finish_reason"] == "length"
        await ws.send_json({"type": "ping"})
        while (message := await ws.receive_json(timeout=30))["type"] != "pong":
            assert message.get("id") == "long"  # late deltas of the cancelled one only
    await wait_until(server.idle, timeout_s=20, what="cancelled conversation freed")


async def test_bad_frames_get_errors_and_socket_survives(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_str("{not json")
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_json"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "binary_frame"
        await ws.send_json([1, 2])
        assert (await ws.receive_json(timeout=10))["type"] == "error"
        await ws.send_json({"type": "dance"})
        assert (await ws.receive_json(timeout=10))["error"]["param"] == "type"
        await ws.send_json({"type": "chat", "id": "x", "messages": [], "max_tokens": 2})
        error = await ws.receive_json(timeout=10)
        assert error["type"] == "error" and error["id"] == "x" and error["error"]["param"] == "messages"
        await ws.send_json({"type": "chat", "id": 5, **CHAT})
        assert (await ws.receive_json(timeout=10))["error"]["param"] == "id"
        await ws.send_json({"type": "chat", "id": "ok", **CHAT, "max_tokens": 3})
        result = await collect(ws, {"ok"})
        assert result["ok"]["final"]["type"] == "done"


async def test_oversized_frame_closes_with_message_too_big(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_str("x" * (server.runtime.config.server.ws_max_frame_bytes + 1))
        message = await ws.receive(timeout=10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_feedback_message_is_journaled_and_acknowledged(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    journal = server.runtime.journal
    assert journal is not None
    before = journal.counts().total
    sample = {"prompt": "colour?", "completion": "blue"}
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_json({"type": "feedback", "id": "f1", "samples": [sample, {**sample, "weight": 2.0}]})
        ack = await ws.receive_json(timeout=30)
        assert ack["type"] == "feedback_accepted" and ack["id"] == "f1"
        assert len(ack["ids"]) == 2 and all(isinstance(i, int) for i in ack["ids"])
        assert ack["training"] == "off"  # the shared test server runs configs/tiny.toml: journal only
        await ws.send_json({"type": "feedback", "id": "f2", "samples": sample})  # one sample, not a list
        assert len((await ws.receive_json(timeout=30))["ids"]) == 1
    assert journal.counts().total == before + 3


async def test_bad_feedback_messages_get_errors_with_their_status(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        await ws.send_json({"type": "feedback", "id": "f1"})
        error = await ws.receive_json(timeout=10)
        assert (error["type"], error["id"], error["status"], error["error"]["param"]) == ("error", "f1", 400, "samples")
        await ws.send_json({"type": "feedback", "id": "f2", "samples": [{"prompt": "no answer"}]})
        error = await ws.receive_json(timeout=10)
        assert (error["id"], error["status"], error["error"]["type"]) == ("f2", 400, "invalid_request_error")
        await ws.send_json({"type": "feedback", "id": "f3", "samples": []})
        assert (await ws.receive_json(timeout=10))["error"]["param"] == "body"
        await ws.send_json({"type": "feedback", "samples": [{"prompt": "a", "completion": "b"}]})
        assert (await ws.receive_json(timeout=10))["error"]["param"] == "id"
        await ws.send_json({"type": "chat", "id": "busy", **CHAT, "max_tokens": 900, "ignore_eos": True})
        await ws.send_json({"type": "feedback", "id": "busy", "samples": {"prompt": "a", "completion": "b"}})
        while (message := await ws.receive_json(timeout=30))["type"] == "delta":
            pass
        assert (message["type"], message["id"], message["error"]["param"]) == ("error", "busy", "id")
        await ws.send_json({"type": "cancel", "id": "busy"})
    await wait_until(server.idle, timeout_s=20, what="the cancelled conversation freed")


async def test_a_flooded_socket_says_when_to_resume(server: RunningServer, http: aiohttp.ClientSession) -> None:
    burst = int(2 * server.runtime.config.server.ws_messages_per_s)
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        for _ in range(burst + 10):
            await ws.send_json({"type": "ping"})
        replies = [await ws.receive_json(timeout=10) for _ in range(burst + 10)]
    dropped = [reply for reply in replies if reply["type"] == "error"]
    assert dropped, "the burst was not limited"
    assert all((r["id"], r["status"], r["error"]["code"]) == (None, 429, "rate_limit_exceeded") for r in dropped)
    assert all(r["retry_after_s"] >= 1 for r in dropped)
