"""When the SDK repeats a learning call, against a scripted server: only a 429 or 503 that carries
Retry-After, within the client's limits; never an error after which the samples may have been stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from mace.client import APITimeoutError, AsyncClient, RateLimitError, ServerError, ServiceUnavailableError
from tests.conftest import serve_app

SAMPLE = {"prompt": "colour?", "completion": "blue"}


@dataclass
class Script:
    """The answers POST /v1/feedback gives, in order; after the last one it accepts."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    num_posts: int = 0


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, Script]]:
    script = Script()

    async def feedback(request: web.Request) -> web.Response:
        script.num_posts += 1
        if script.answers:
            status, headers = script.answers.pop(0)
            if status == 0:  # never answers: the client's timeout ends the call
                await asyncio.Event().wait()
            return web.json_response({"error": {"message": "no", "type": "x", "code": "c"}}, status=status,
                                     headers=headers)
        return web.json_response({"object": "feedback.accepted", "ids": [41, 42]}, status=202)

    app = web.Application()
    app.router.add_post("/v1/feedback", feedback)
    runner, url = await serve_app(app)
    try:
        yield url, script
    finally:
        await runner.cleanup()


async def test_429_and_503_with_retry_after_are_repeated(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.answers = [(429, {"Retry-After": "0"}), (503, {"Retry-After": "0"})]
    async with AsyncClient(url) as client:
        assert await client.feedback([SAMPLE, SAMPLE]) == [41, 42]
    assert script.num_posts == 3


async def test_the_retry_budget_ends_with_the_last_error(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.answers = [(503, {"Retry-After": "0"})] * 3
    async with AsyncClient(url, max_retries=2) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            await client.feedback(SAMPLE)
    assert caught.value.retry_after_s == 0.0 and script.num_posts == 3


@pytest.mark.parametrize(("answer", "error"), [
    ((429, {}), RateLimitError),  # no Retry-After: the server did not say when
    ((429, {"Retry-After": "60"}), RateLimitError),  # longer than max_retry_wait_s: the caller decides
    ((500, {"Retry-After": "0"}), ServerError),  # the write may have happened
    ((0, {}), APITimeoutError),  # no answer: the samples may be stored
])
async def test_other_failures_are_not_repeated(
    scripted: tuple[str, Script], answer: tuple[int, dict[str, str]], error: type[Exception]
) -> None:
    url, script = scripted
    script.answers = [answer]
    async with AsyncClient(url, timeout_s=0.5) as client:
        with pytest.raises(error):
            await client.feedback(SAMPLE)
    assert script.num_posts == 1


async def test_no_retries_when_the_client_says_so(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.answers = [(429, {"Retry-After": "0"})]
    async with AsyncClient(url, max_retries=0) as client:
        with pytest.raises(RateLimitError):
            await client.feedback(SAMPLE)
    assert script.num_posts == 1
    with pytest.raises(ValueError):
        AsyncClient(url, max_retries=-1)
