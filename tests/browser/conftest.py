"""Browser fixtures: Debian's Chromium driven by Playwright's async API on the tests' event loop.

`make browser` (a dependency of `make pytest`) installs Chromium; Playwright's own browser
downloads are never used. Set MACE_SCREENSHOTS=1 to refresh docs/screenshots/ from the tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        message = "Chromium is not installed: `make browser` installs Debian's package"
        if os.environ.get("MACE_REQUIRE_BROWSER"):  # `make test` installs it: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh tab (own storage); a script error or a console error on it fails the test."""
    context = await browser.new_context(viewport={"width": 1200, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    opened.on("console", lambda message: _note_console_error(message, problems))
    yield opened
    await context.close()
    assert not problems, problems


# The browser itself logs refused requests and websocket upgrades (tests provoke 401s on purpose);
# anything else logged as an error is the page's own.
_NETWORK_NOISE = ("Failed to load resource", "WebSocket connection to")


def _note_console_error(message: ConsoleMessage, problems: list[str]) -> None:
    if message.type == "error" and not message.text.startswith(_NETWORK_NOISE):
        problems.append(f"console error: {message.text}")


async def keep_screenshot(page: Page, name: str) -> None:
    """Refresh docs/screenshots/<name>.png when MACE_SCREENSHOTS is set."""
    if os.environ.get("MACE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
