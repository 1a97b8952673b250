"""The pages on a server with API keys: the pages stay open, the API calls they make carry the key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Page, expect

from mace.model.loader import ModelBundle
from mace.server.auth import hash_key
from tests.browser.test_chat import ANSWER, say
from tests.conftest import RunningServer, start_server, tiny_config

KEY = "sk-browser-0001"


@pytest.fixture(scope="module")
async def keyed(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    keys = [{"sha256": hash_key(KEY), "name": "browser", "scopes": ["infer", "train"]}]
    config = tiny_config(tmp_path_factory.mktemp("keyed-pages"), server={"api_keys": keys})
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def test_pages_are_open_and_stats_need_a_key(keyed: RunningServer, http: aiohttp.ClientSession) -> None:
    for path in ["/", "/dashboard", "/static/chat.js"]:
        async with http.get(keyed.url + path) as response:
            assert response.status == 200, path
    async with http.get(keyed.url + "/v1/stats") as response:
        assert response.status == 401
    async with http.get(keyed.url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 200


async def test_chat_asks_for_the_key_then_works_with_it(page: Page, keyed: RunningServer) -> None:
    await page.goto(keyed.url + "/")
    await expect(page.locator("#connection")).to_have_text("API key needed")
    await expect(page.get_by_role("button", name="Send")).to_be_disabled()
    await page.get_by_label("API key").fill(KEY)
    await page.get_by_label("API key").press("Tab")
    await expect(page.locator("#connection")).to_have_text("connected")  # the upgrade carried ?api_key=
    await expect(page.locator("#model")).to_have_text("builtin:tiny")
    await page.get_by_label("max tokens").fill("4")
    await say(page, "Hello")
    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-state", "done")
    await answer.get_by_role("button", name="Correct this answer").click()
    await answer.get_by_label("Corrected answer").fill("Hello to you.")
    await answer.get_by_role("button", name="Send correction").click()
    await expect(answer.get_by_role("status")).to_contain_text("Correction saved as training sample #")


async def test_dashboard_asks_for_the_key_then_goes_live(page: Page, keyed: RunningServer) -> None:
    await page.goto(keyed.url + "/dashboard")
    await expect(page.get_by_role("alert")).to_have_text(
        "This server needs an API key: enter it in the key field above."
    )
    await page.get_by_label("API key").fill(KEY)
    await expect(page.locator("#connection")).to_have_text("live")
    await expect(page.get_by_role("alert")).to_be_hidden()
    await expect(page.locator("#running")).to_have_text("0")
