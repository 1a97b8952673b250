"""Health, readiness, metrics; they answer while the model computes or loads."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mace.model.loader import ModelBundle
from mace.server.app import create_app
from mace.server.metrics import ServerMetrics
from tests.conftest import RunningServer, tiny_config, wait_until


def metric_values(text: str) -> dict[str, float]:
    return {
        sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/metrics") as response:
        before = metric_values(await response.text())
    body = {"model": "builtin:tiny", "prompt": "hi", "max_tokens": 5, "ignore_eos": True}
    async with http.post(server.url + "/v1/completions", json=body) as response:
        assert response.status == 200
    async with http.get(server.url + "/metrics") as response:
        after = metric_values(await response.text())
    assert after["mace:generation_tokens_total"] - before.get("mace:generation_tokens_total", 0) == 5
    assert after["mace:time_to_first_token_seconds_count"] > before.get("mace:time_to_first_token_seconds_count", 0)
    assert after["mace:e2e_request_latency_seconds_count"] > before.get("mace:e2e_request_latency_seconds_count", 0)
    assert "mace:kv_cache_usage_perc" in after and "mace:num_requests_running" in after
    assert "mace:latency_margin_seconds" in after and "mace:latency_model_error_seconds" in after
    assert after["mace:decode_cap"] >= 1  # SLO scheduling caps the batch; it never shuts it


async def test_health_answers_while_the_engine_computes(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400,
            "ignore_eos": True}
    generation = asyncio.create_task(http.post(server.url + "/v1/chat/completions", json=body))
    engine = server.runtime.engine
    assert engine is not None

    async def busy() -> bool:
        return engine.core.blocks.num_used_blocks > 0

    await wait_until(busy, what="generation running")
    started = time.monotonic()
    for path in ("/health", "/ready", "/metrics"):
        async with http.get(server.url + path) as response:
            assert response.status == 200
    assert engine.core.blocks.num_used_blocks > 0, "the probes should have answered during the generation"
    assert time.monotonic() - started < 5
    (await generation).close()


async def test_ready_is_503_until_the_model_loads(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    release = threading.Event()

    def slow_load() -> ModelBundle:
        release.wait(30)
        return tiny_bundle

    app = create_app(tiny_config(tmp_path), load=slow_load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://{}:{}".format(*runner.addresses[0][:2])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as response:
                assert response.status == 200
            async with session.get(url + "/ready") as response:
                assert response.status == 503
                assert response.headers["Retry-After"]
            body = {"model": "builtin:tiny", "prompt": "x", "max_tokens": 2}
            async with session.post(url + "/v1/completions", json=body) as response:
                assert response.status == 503
            release.set()

            async def ready() -> bool:
                async with session.get(url + "/ready") as response:
                    return response.status == 200

            await wait_until(ready, what="ready after the load finished")
    finally:
        release.set()
        await runner.cleanup()


def test_a_scrape_reads_the_engine_load_once() -> None:
    reads: list[None] = []

    def load() -> None:
        reads.append(None)

    metrics = ServerMetrics(load)
    reads.clear()  # registering the collector reads it once to learn its names
    families = {family.name: family for family in text_string_to_metric_families(
        generate_latest(metrics.registry).decode())}
    assert len(reads) == 1
    assert families["mace:num_requests_running"].samples[0].value == 0.0
    assert "mace:decode_cap" in families and "mace:drift_signal" in families
