"""Servers for the loadgen tests: the real tiny mace server in-process, and a scripted fake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mace.config import load_config
from mace.server.app import create_app
from tests.conftest import serve_app
from tests.loadgen.fake_server import fake_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def tiny_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("loadgen-tiny")
    config = load_config(ROOT / "configs" / "tiny.toml", {"cache_dir": str(tmp), "data_dir": str(tmp / "data")},
                         environ={})
    runner, url = await serve_app(create_app(config))
    try:
        deadline = time.monotonic() + 60.0
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{url}/ready") as response:
                    if response.status == 200:
                        break
                assert time.monotonic() < deadline, "the tiny server did not become ready"
                await asyncio.sleep(0.05)
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    runner, url = await serve_app(fake_app())
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def slow_fake_url() -> AsyncIterator[str]:
    runner, url = await serve_app(fake_app(chunk_delay_s=2.0))
    try:
        yield url
    finally:
        await runner.cleanup()
