"""Hostile input, generated: requests from the published /openapi.json (schemathesis, valid and invalid
bodies), hand-made nasties (deep nesting, huge and negative numbers, odd Unicode, wrong content types)
and websocket message sequences. The server never answers 5xx, never hangs, and leaks no KV block."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from mace.model.loader import ModelBundle
from mace.server.openapi import build_spec
from tests.conftest import RunningServer, start_server, tiny_config, wait_until

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TIMEOUT = aiohttp.ClientTimeout(total=30)  # a hang fails the test instead of stalling it
NASTY_TEXT = st.sampled_from(["", "\x00", "\u202e\u200b\ufeff", "e\u0301" * 50, "\U0001f600" * 30, "\udcff",
                              "😀"[:1] + "\ud83d", "a" * 5000, "<|endoftext|>", "\r\n\r\n"])
NASTY_NUMBER = st.sampled_from([-1, 0, -(2**63), 2**63, 10**400, -1e308, 1e308, 0.5,
                                1e-40, 5e-324, 2.225073858507e-311, float("nan")])
_SCHEMA = schemathesis.openapi.from_dict(build_spec("mace"))
_POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/feedback"]


@pytest.fixture(scope="module")
async def target(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    server = {"max_output_tokens": 8, "default_max_tokens": 4, "max_body_bytes": 64 * 1024}
    runner, url = await start_server(tiny_config(tmp_path_factory.mktemp("fuzz"), server=server), tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


def _case_strategy(path: str, method: str) -> st.SearchStrategy[Any]:
    operation = _SCHEMA[path][method]
    return st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                     operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))


def _deep(depth: int) -> bytes:
    return b'{"model":"builtin:tiny","messages":' + b"[" * depth + b"]" * depth + b"}"


async def _check(response: aiohttp.ClientResponse) -> None:
    body = await response.read()  # an SSE stream is read to its end, which must come
    assert response.status < 500, body[:500]
    if response.status >= 400:
        error = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} <= set(error)


async def _send(url: str, method: str, path: str, body: bytes | None, content_type: str | None,
                query: dict[str, Any] | None = None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    # On the wire a query value is text: schema-violating cases (objects, arrays, null) go as their JSON.
    params = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (query or {}).items()}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, \
            http.request(method, url + path, data=body, headers=headers, params=params or None) as response:
        await _check(response)


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def _openapi_request(draw: st.DrawFn) -> tuple[str, str, bytes | None, str | None, dict[str, Any]]:
    others = ["/v1/adapters/{version}/activate", "/v1/models", "/v1/feedback", "/v1/stats"]
    path = draw(st.sampled_from([*_POSTS, *_POSTS[:2], *others]))  # generation weighs more: it reaches the engine
    method = "GET" if path in ("/v1/models", "/v1/stats") or (path == "/v1/feedback" and draw(st.booleans())) \
        else "POST"
    case = draw(_case_strategy(path, method))
    body = case.body if isinstance(case.body, dict | list | bytes | str | int | float | bool) else None
    if isinstance(body, dict) and "model" in body and draw(st.integers(0, 3)) > 0:
        body["model"] = "builtin:tiny"  # past the model check and the max_tokens cap, so generation runs too
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int | float):
                body[field] = int(body[field]) % 9
        if draw(st.booleans()):  # random messages are mostly blank: give the rest of the body a chance
            body.update(messages=[{"role": "user", "content": "hi"}], prompt="hi", echo=False)
    encoded = _encode(body) if body is not None else None
    return method, case.formatted_path, encoded, case.media_type if encoded is not None else None, case.query or {}


@st.composite
def _hand_made(draw: st.DrawFn) -> tuple[str, str, bytes | None, str | None, dict[str, Any]]:
    path = draw(st.sampled_from(_POSTS))
    kind = draw(st.sampled_from(["deep", "field", "content_type", "garbage"]))
    base: dict[str, Any] = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}],
                            "prompt": "hi", "completion": "there", "max_tokens": 2}
    if kind == "deep":
        return "POST", path, _deep(draw(st.sampled_from([100, 1000, 100000]))), "application/json", {}
    if kind == "field":
        field = draw(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "prompt",
                                      "messages", "completion", "weight", "stream", "n", "model", "user"]))
        base[field] = draw(st.one_of(NASTY_NUMBER, NASTY_TEXT, st.lists(NASTY_TEXT, max_size=6),
                                     st.just([{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}])))
        return "POST", path, _encode(base), "application/json", {}
    if kind == "content_type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                             "application/json; charset=latin-1", "", "application/xml"]))
        return "POST", path, _encode(base), content_type or None, {}
    return "POST", path, draw(st.binary(max_size=512)), "application/json", {}


@FUZZ
@given(request=st.one_of(_openapi_request(), _hand_made()))
async def test_http_api_never_5xx(target: RunningServer, request: tuple[str, str, bytes | None, str | None,
                                                                         dict[str, Any]]) -> None:
    method, path, body, content_type, query = request
    await _send(target.url, method, path, body, content_type, query)


_WS_MESSAGE = st.one_of(
    st.fixed_dictionaries({"type": st.just("chat"), "id": st.one_of(st.text(max_size=3), NASTY_NUMBER, st.none()),
                           "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), NASTY_TEXT,
                                                 st.lists(st.fixed_dictionaries({"role": NASTY_TEXT}), max_size=2))},
                          optional={"max_tokens": st.one_of(st.integers(-5, 12), NASTY_NUMBER),
                                    "temperature": NASTY_NUMBER, "stream": st.booleans()}),
    st.fixed_dictionaries({"type": st.just("cancel"), "id": st.one_of(st.text(max_size=3), NASTY_NUMBER)}),
    st.just({"type": "ping"}),
    st.recursive(st.none() | st.booleans() | NASTY_NUMBER | NASTY_TEXT,
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NASTY_TEXT, inner, max_size=3)),
    st.binary(max_size=64),
)


@FUZZ
@given(messages=st.lists(_WS_MESSAGE, min_size=1, max_size=6))
async def test_websocket_never_5xx(target: RunningServer, messages: list[Any]) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.ws_connect(f"{target.url}/v1/ws") as ws:
        for message in messages:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(json.dumps(message, allow_nan=True).encode("utf-8", "surrogatepass")
                                  .decode("utf-8", "replace"))
        await ws.send_json({"type": "ping"})
        pongs_due = 1 + sum(message == {"type": "ping"} for message in messages)
        while pongs_due:  # the last pong proves the socket still answers after all of it
            reply = await ws.receive_json(timeout=30)
            assert reply.get("error", {}).get("type") != "server_error", reply
            pongs_due -= reply["type"] == "pong"


async def test_slow_clients_do_not_stall_others(target: RunningServer) -> None:
    host, port = target.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    _, stalled = await asyncio.open_connection(host, int(port))
    stalled.write(head + body[:10].encode())  # then nothing more: a client that stalls mid-body
    trickle_reader, trickle = await asyncio.open_connection(host, int(port))
    trickle.write(head)
    for index in range(0, len(body), 8):  # a slow but live client, a few bytes at a time
        trickle.write(body[index:index + 8].encode())
        await trickle.drain()
        await _send(target.url, "GET", "/health", None, None)  # others are served meanwhile
    status_line = await asyncio.wait_for(trickle_reader.readline(), 30)
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    await _send(target.url, "POST", "/v1/chat/completions", body.encode(), "application/json")
    for writer in (trickle, stalled):
        writer.close()
        await writer.wait_closed()


async def test_after_the_fuzz_nothing_is_left_running(target: RunningServer) -> None:
    await wait_until(target.idle, what="every fuzzed request to be finished and its KV blocks freed")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.get(f"{target.url}/health") as response:
        assert response.status == 200
