"""Shared fixtures: the tiny model loaded once, and a real mace server on a loopback port."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp import web

from mace.config import MaceConfig, load_config
from mace.model.loader import ModelBundle, load_model
from mace.server.app import create_app
from mace.server.keys import RUNTIME
from mace.server.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def benchmark_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module, so a test can call its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp: Path, **sections: dict[str, object]) -> MaceConfig:
    overrides: dict[str, object] = {"cache_dir": str(tmp / "cache"), "data_dir": str(tmp / "data"), **sections}
    return load_config(ROOT / "configs" / "tiny.toml", overrides, environ={})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    config = tiny_config(tmp_path_factory.mktemp("tiny"))
    return load_model(config.model, config.cache_dir)


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@dataclass
class RunningServer:
    url: str
    app: web.Application

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    async def idle(self) -> bool:
        engine = self.runtime.engine
        assert engine is not None
        return (
            not engine.core.scheduler.has_work
            and engine.core.blocks.num_used_blocks == 0
            and engine.core.runner.kv.num_used_slots == 0
        )


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free loopback port; returns the runner (to clean up) and the base URL."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def start_server(config: MaceConfig, bundle: ModelBundle | None = None) -> tuple[web.AppRunner, str]:
    runner, url = await serve_app(create_app(config, load=(lambda: bundle) if bundle is not None else None))

    async def ready() -> bool:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/ready") as response:
            return response.status == 200

    await wait_until(ready, timeout_s=120, what="server ready")  # the default model warms up in ~10-30 s
    return runner, url


@pytest.fixture(scope="session")
async def server(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    config = tiny_config(tmp_path_factory.mktemp("server"))
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
