"""Refresh docs/screenshots/chat.png and dashboard.png from a real server and Debian's Chromium.

    .venv/bin/python docs/screenshots/capture.py [--model builtin:smollm2] [--seconds 60]

Serves the model on a loopback port (data in a temporary directory, learning on), asks a question
in the chat page and corrects the answer, then keeps a mixed load and feedback going while the
dashboard fills, and screenshots both pages.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from playwright.async_api import Page, async_playwright

from mace.config import load_config
from mace.server.app import create_app

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
QUESTION = "What is the capital of France?"
TOPICS = ["a short poem about the sea", "three facts about owls", "how a bicycle works", "a haiku about rain"]


async def serve(model: str, data_dir: Path) -> tuple[web.AppRunner, str]:
    config = load_config(ROOT / "configs" / "default.toml", {
        "model": {"name": model}, "data_dir": str(data_dir), "train": {"policy": "mace"},
    })
    runner = web.AppRunner(create_app(config), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(url + "/ready") as response:
                if response.status == 200:
                    return runner, url
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become ready")


async def chat(page: Page, url: str) -> None:
    await page.goto(url + "/")
    await page.locator("#connection[data-state=open]").wait_for()
    await page.get_by_label("max tokens").fill("48")
    await page.get_by_label("temperature").fill("0")
    await page.get_by_label("Message").fill(QUESTION)
    await page.get_by_role("button", name="Send").click()
    answer = page.locator(".message.assistant[data-state=done]").first
    await answer.wait_for(timeout=120_000)
    await answer.get_by_role("button", name="Correct this answer").click()
    await answer.get_by_label("Corrected answer").fill("The capital of France is Paris.")
    await answer.get_by_role("button", name="Send correction").click()
    await answer.get_by_role("status").filter(has_text="saved").wait_for()
    await page.get_by_label("Message").fill("And of Italy?")
    await page.get_by_role("button", name="Send").click()
    await page.locator(".message.assistant[data-state=done]").nth(1).wait_for(timeout=120_000)
    await page.screenshot(path=str(HERE / "chat.png"))


async def traffic(url: str, model: str, until_s: float) -> None:
    """A few clients asking, each waiting a little between requests; some answers come back corrected."""
    rng = random.Random(0)
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while time.monotonic() < until_s:
                topic = rng.choice(TOPICS)
                body = {"model": model, "messages": [{"role": "user", "content": f"Write {topic}."}],
                        "max_tokens": rng.randint(16, 64)}
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                if rng.random() < 0.5:
                    sample = {"prompt": f"Write {topic}.", "completion": f"Here is {topic}, as you asked."}
                    await (await session.post(url + "/v1/feedback", json=sample)).read()
                await asyncio.sleep(rng.uniform(0.5, 3.0))

        await asyncio.gather(*(client() for _ in range(3)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the dashboard watches the load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        runner, url = await serve(args.model, Path(data_dir))
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium")
                page = await browser.new_page(viewport={"width": 1200, "height": 760})
                await chat(page, url)
                await page.set_viewport_size({"width": 1200, "height": 1400})
                await page.goto(url + "/dashboard")
                await traffic(url, args.model, time.monotonic() + args.seconds)
                await page.screenshot(path=str(HERE / "dashboard.png"), full_page=True)
                await browser.close()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
