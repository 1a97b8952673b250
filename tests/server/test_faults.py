"""A journal that cannot write (read-only, full, or a data dir that cannot hold it) makes feedback answer 503
with Retry-After while generation goes on; a drain refuses new requests and lets running ones finish."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mace.model.loader import ModelBundle
from tests.conftest import RunningServer, start_server, tiny_config, wait_until

CHAT = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
SAMPLE = {"prompt": "colour?", "completion": "blue"}


@pytest.fixture
async def fresh(tiny_bundle: ModelBundle, tmp_path: Path) -> AsyncIterator[RunningServer]:
    runner, url = await start_server(tiny_config(tmp_path), tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def assert_feedback_503_and_chat_200(url: str, http: aiohttp.ClientSession, reason: str) -> int:
    """Sends feedback until it is refused (a full table may still take what fits its last page);
    returns how many samples were acknowledged before that."""
    for num_acknowledged in range(64):  # noqa: B007 (the count is the result)
        async with http.post(f"{url}/v1/feedback", json={**SAMPLE, "completion": "blue " * 50}) as response:
            if response.status == 202:
                continue
            assert response.status == 503
            assert int(response.headers["Retry-After"]) > 0
            error = (await response.json())["error"]
            assert error["code"] == "journal_unavailable" and reason in error["message"]
            break
    else:
        raise AssertionError("feedback was never refused")
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    return num_acknowledged


@pytest.mark.parametrize(("pragma", "reason"), [
    ("PRAGMA query_only = ON", "readonly"),  # what SQLite answers on a read-only file or mount
    # SQLITE_FULL, as on a full disk. SQLite rolls the transaction back itself, and the journal's own
    # ROLLBACK then reports "no transaction is active" instead of the disk: only the status is checked.
    ("PRAGMA max_page_count = {pages}", ""),
])
async def test_journal_write_failure_is_503_and_recovers(
    fresh: RunningServer, http: aiohttp.ClientSession, pragma: str, reason: str
) -> None:
    journal = fresh.runtime.journal
    assert journal is not None
    db: sqlite3.Connection = journal._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(pragma.format(pages=pages))
    num_acknowledged = await assert_feedback_503_and_chat_200(fresh.url, http, reason)
    db.execute("PRAGMA query_only = OFF")
    db.execute("PRAGMA max_page_count = 1073741823")
    async with http.post(f"{fresh.url}/v1/feedback", json=[SAMPLE, SAMPLE]) as response:
        assert response.status == 202  # the disk has room again: nothing to restart
    async with http.get(f"{fresh.url}/v1/feedback") as response:
        assert (await response.json())["total"] == num_acknowledged + 2  # the refused one left nothing behind


async def test_unusable_data_dir_still_serves(
    tiny_bundle: ModelBundle, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "data").write_text("a file where the data dir should be")
    config = tiny_config(tmp_path, train={"policy": "continuous"})
    runner, url = await start_server(config, tiny_bundle)
    try:
        await assert_feedback_503_and_chat_200(url, http, "Error")
    finally:
        await runner.cleanup()


async def test_drain_refuses_new_requests_and_finishes_running_ones(
    fresh: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT, "max_tokens": 150, "ignore_eos": True, "stream": True}
    async with http.post(f"{fresh.url}/v1/chat/completions", json=body) as stream:
        await stream.content.readline()
        draining = asyncio.create_task(fresh.runtime.drain(timeout_s=60))
        await wait_until(lambda: asyncio.sleep(0, fresh.runtime.is_draining), what="admission to close")
        async with http.post(f"{fresh.url}/v1/chat/completions", json=CHAT) as refused:
            assert refused.status == 503 and "Retry-After" in refused.headers
            assert (await refused.json())["error"]["code"] == "shutting_down"
        async with http.get(f"{fresh.url}/health") as health:
            assert health.status == 200
        assert not draining.done()  # it waits for the stream
        text = await stream.text()
    assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in text
    await asyncio.wait_for(draining, 10)
