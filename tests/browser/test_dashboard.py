"""The dashboard (GET /dashboard) in Chromium: its numbers and charts follow a server under load and learning."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, expect

from mace.model.loader import load_model
from tests.browser.conftest import keep_screenshot
from tests.conftest import RunningServer, start_server, tiny_config

# Publishes within seconds on the tiny model (as in tests/train/test_learning.py).
TRAIN = {"policy": "mace", "learning_rate": 0.01, "batch_size": 2, "lora_rank": 16, "heldout_every": 4,
         "max_staleness_s": 3600, "min_publish_interval_s": 1.0, "drift_full_ratio": 1.1}
QUESTION = [{"role": "user", "content": "What is the secret word?"}]
POSITIVE = re.compile(r"^[1-9]\d*$")
DURATION = re.compile(r"^\d+(\.\d+)? m?s$")


@pytest.fixture
async def learning_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = tiny_config(tmp_path, train=TRAIN)
    # A fresh model: training adds LoRA adapters to it, which the session's shared bundle must not get.
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def load(url: str, num_requests: int, max_tokens: int) -> None:
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "talk"}], "max_tokens": max_tokens,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200

        await asyncio.gather(*(one() for _ in range(num_requests)))


async def test_numbers_follow_load_and_learning(page: Page, learning_server: RunningServer) -> None:
    await page.goto(learning_server.url + "/dashboard")
    await expect(page.locator("#connection")).to_have_text("live")
    await expect(page.locator("#model")).to_have_text("builtin:tiny")
    await expect(page.locator("#train-policy")).to_have_text("mace")
    await expect(page.locator("#training-off")).to_be_hidden()
    await expect(page.locator("#tokens-per-s")).to_have_text("0.0")
    await expect(page.locator("#running")).to_have_text("0")
    await expect(page.locator("#ttft-p50")).to_have_text("—")

    traffic = asyncio.create_task(load(learning_server.url, num_requests=4, max_tokens=400))
    await expect(page.locator("#running")).to_have_text(POSITIVE)
    await page.wait_for_function("() => parseFloat(document.getElementById('tokens-per-s').value) > 0")
    await page.wait_for_function("() => parseFloat(document.getElementById('kv-usage').value) > 0")
    await expect(page.locator("#ttft-p50")).to_have_text(DURATION)
    await expect(page.locator("#tpot-p99")).to_have_text(DURATION)
    await traffic
    await expect(page.locator("#running")).to_have_text("0")
    assert int(await page.locator("#chart-throughput").get_attribute("data-points") or 0) > 4

    samples = [{"messages": [*QUESTION, {"role": "assistant", "content": "zebra"}]}] * 8
    async with aiohttp.ClientSession() as session, session.post(
        learning_server.url + "/v1/feedback", json=samples
    ) as response:
        assert response.status == 202
    await expect(page.locator("#train-steps")).to_have_text(POSITIVE, timeout=60_000)
    await page.wait_for_function("() => parseFloat(document.getElementById('train-share').value) > 0")
    await expect(page.locator("#events li")).not_to_have_count(0, timeout=180_000)
    await expect(page.locator("#adapter-active")).not_to_have_text("v0")
    first_publish = await page.locator("#events li").last.inner_text()
    found = re.search(r"v1 published \(.+\) · held-out loss ([\d.]+) → ([\d.]+)$", first_publish)
    assert found is not None, first_publish
    assert float(found[2]) < float(found[1])  # published because the learner did better
    await expect(page.locator("#loss-learner")).to_have_text(re.compile(r"^\d+\.\d{3}$"))
    await keep_screenshot(page, "dashboard")


async def test_a_server_that_does_not_learn_says_so(page: Page, server: RunningServer) -> None:
    await page.goto(server.url + "/dashboard")  # the shared test server: configs/tiny.toml, policy none
    await expect(page.locator("#connection")).to_have_text("live")
    await expect(page.locator("#training-off")).to_be_visible()
    await expect(page.locator("#training-off")).to_contain_text("feedback is kept in the journal")
