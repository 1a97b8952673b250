"""The chat page (GET /) in Chromium: streaming over /v1/ws, stop, corrections to /v1/feedback, history."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
from playwright.async_api import Page, WebSocket, expect

from tests.browser.conftest import keep_screenshot
from tests.conftest import RunningServer, wait_until

ANSWER = ".message.assistant"


async def open_chat(page: Page, server: RunningServer, max_tokens: int, temperature: float = 0.0) -> None:
    await page.goto(server.url + "/")
    await expect(page.locator("#connection")).to_have_text("connected")
    await page.get_by_label("max tokens").fill(str(max_tokens))
    await page.get_by_label("temperature").fill(str(temperature))


async def say(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_role("button", name="Send").click()


async def count_text_updates(page: Page) -> None:
    """Count, in the page, every change to a message's text from here on."""
    await page.evaluate("""() => {
        window.textUpdates = 0;
        new MutationObserver((records) => { window.textUpdates += records.length; })
            .observe(document.getElementById('messages'), {subtree: true, characterData: true});
    }""")


async def feedback_total(http: aiohttp.ClientSession, server: RunningServer) -> int:
    async with http.get(server.url + "/v1/feedback") as response:
        assert response.status == 200
        return int((await response.json())["total"])


async def test_reply_streams_in_and_shows_model_and_adapter(page: Page, server: RunningServer) -> None:
    await open_chat(page, server, max_tokens=120)
    await expect(page.locator("#model")).to_have_text("builtin:tiny")
    await expect(page.locator("#adapter")).to_have_text("v0")
    await count_text_updates(page)
    await say(page, "Tell me a story about a cat.")
    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-state", "done")
    summary = re.compile(r"^adapter v0 · \d+ tokens · (length|stop)$")
    await expect(answer.locator(".meta span").first).to_have_text(summary)
    assert len(await answer.locator(".text").inner_text()) > 0
    # Delivered piece by piece as the engine produced it, not as one block at the end.
    assert await page.evaluate("window.textUpdates") >= 10
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()


async def test_stop_aborts_the_generation(page: Page, server: RunningServer) -> None:
    await open_chat(page, server, max_tokens=900)  # minutes of tokens: only Stop ends it within the test
    await say(page, "Count to a thousand.")
    answer = page.locator(ANSWER).last
    await expect(answer.locator(".text")).not_to_have_text("")
    await page.get_by_role("button", name="Stop").click()
    await expect(answer).to_have_attribute("data-state", "stopped")
    await expect(answer.locator(".meta")).to_contain_text("stopped")
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()
    stopped_text = await answer.locator(".text").inner_text()
    await wait_until(server.idle, timeout_s=10, what="the server to abort the stopped request")
    assert await answer.locator(".text").inner_text() == stopped_text  # late deltas are not shown


async def test_correction_is_stored_as_a_training_sample(
    page: Page, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    await open_chat(page, server, max_tokens=12)
    await page.get_by_label("API key").fill("sk-test-browser-key")
    await page.get_by_label("API key").press("Tab")  # a new key reopens the socket with it
    await expect(page.locator("#connection")).to_have_text("connected")
    await say(page, "What is the capital of France?")
    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-state", "done")
    before = await feedback_total(http, server)

    await answer.get_by_role("button", name="Correct this answer").click()
    await answer.get_by_label("Corrected answer").fill("The capital of France is Paris.")
    async with page.expect_request("**/v1/feedback") as sent:
        await answer.get_by_role("button", name="Send correction").click()
    request = await sent.value
    assert request.headers["authorization"] == "Bearer sk-test-browser-key"
    assert request.post_data_json == {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]}
    await expect(answer.get_by_role("status")).to_contain_text("Correction saved as training sample #")
    await expect(answer.locator(".text")).to_have_text("The capital of France is Paris.")
    assert await feedback_total(http, server) == before + 1


async def test_correction_refused_for_a_missing_key_asks_for_one(page: Page, server: RunningServer) -> None:
    await open_chat(page, server, max_tokens=8)
    await say(page, "Hello")
    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-state", "done")
    refusal = {"error": {"message": "missing API key", "type": "authentication_error", "param": None,
                         "code": "missing_api_key"}}
    await page.route("**/v1/feedback", lambda route: route.fulfill(status=401, json=refusal))
    await answer.get_by_role("button", name="Correct this answer").click()
    await answer.get_by_label("Corrected answer").fill("Hi there.")
    await answer.get_by_role("button", name="Send correction").click()
    await expect(answer.get_by_role("status")).to_have_text(
        "This server needs an API key: enter it in the key field above."
    )
    await expect(page.get_by_label("API key")).to_be_focused()
    await expect(answer.locator(".text")).not_to_have_text("Hi there.")  # nothing was stored


async def test_history_is_sent_with_every_turn(page: Page, server: RunningServer) -> None:
    frames: list[dict[str, Any]] = []

    def watch(socket: WebSocket) -> None:
        socket.on("framesent", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", watch)
    await open_chat(page, server, max_tokens=6)
    await say(page, "First question")
    await expect(page.locator(ANSWER).nth(0)).to_have_attribute("data-state", "done")
    first_answer = await page.locator(ANSWER).nth(0).locator(".text").inner_text()
    await say(page, "Second question")
    await expect(page.locator(ANSWER).nth(1)).to_have_attribute("data-state", "done")

    chats = [frame for frame in frames if frame["type"] == "chat"]
    assert [len(chat["messages"]) for chat in chats] == [1, 3]
    assert chats[1]["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "Second question"},
    ]
    assert chats[1]["max_tokens"] == 6 and chats[1]["temperature"] == 0
    await keep_screenshot(page, "chat")

    await page.get_by_role("button", name="New chat").click()
    await expect(page.locator(".message")).to_have_count(0)
    await say(page, "Fresh start")
    await expect(page.locator(ANSWER).nth(0)).to_have_attribute("data-state", "done")
    assert len([frame for frame in frames if frame["type"] == "chat"][-1]["messages"]) == 1
