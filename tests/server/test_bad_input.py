"""Every bad input gets a 4xx in OpenAI's error shape, never a 500 or a hang."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningServer

CHAT = "/v1/chat/completions"
GOOD = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_openai_error(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**GOOD, "messages": []}, 400, "messages"),
        ({k: v for k, v in GOOD.items() if k != "messages"}, 400, "messages"),
        ({**GOOD, "messages": [{"role": "user", "content": ""}]}, 400, None),
        ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({**GOOD, "messages": "hi"}, 400, "messages"),
        ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
        ({**GOOD, "max_tokens": -5}, 400, "max_tokens"),
        ({**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
        ({**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
        ({**GOOD, "temperature": -1}, 400, "temperature"),
        ({**GOOD, "top_p": 0}, 400, "top_p"),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**GOOD, "n": 3}, 400, "n"),
        ({**GOOD, "model": "no-such-model"}, 404, "model"),
        ({**GOOD, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
        ([1, 2, 3], 400, None),
    ],
)
async def test_invalid_chat_bodies(
    server: RunningServer, http: aiohttp.ClientSession, body: Any, status: int, param: str | None
) -> None:
    async with http.post(server.url + CHAT, json=body) as response:
        assert response.status == status
        payload = await response.json()
    assert_openai_error(payload)
    if param is not None:
        assert payload["error"]["param"] == param


async def test_malformed_json(server: RunningServer, http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(server.url + CHAT, data=b'{"model": ', headers=headers) as response:
        assert response.status == 400
        assert_openai_error(await response.json())


async def test_wrong_content_type(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(server.url + CHAT, data=b"hello", headers={"Content-Type": "text/plain"}) as response:
        assert response.status == 415
        assert_openai_error(await response.json())


async def test_oversized_body(server: RunningServer, http: aiohttp.ClientSession) -> None:
    big = orjson.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]})
    headers = {"Content-Type": "application/json"}
    async with http.post(server.url + CHAT, data=io.BytesIO(big), headers=headers) as response:
        assert response.status == 413
        assert_openai_error(await response.json())


async def test_unknown_route_and_method(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/v1/nothing") as response:
        assert response.status == 404
        assert_openai_error(await response.json())
    async with http.get(server.url + CHAT) as response:
        assert response.status == 405
        assert_openai_error(await response.json())


async def test_out_of_vocab_token_prompt(server: RunningServer, http: aiohttp.ClientSession) -> None:
    body = {"model": "builtin:tiny", "prompt": [1, 2, 10**9], "max_tokens": 2}
    async with http.post(server.url + "/v1/completions", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "prompt"


async def test_server_still_serves_after_bad_inputs(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(server.url + CHAT, json=GOOD) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["finish_reason"] in ("length", "stop")
