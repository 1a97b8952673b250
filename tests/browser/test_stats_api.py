"""GET /v1/stats, the JSON behind the dashboard, and the bucket percentiles it computes."""

from __future__ import annotations

import math

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Histogram

from mace.server.stats_api import Buckets
from tests.conftest import RunningServer, wait_until


def histogram(values: list[float], buckets: tuple[float, ...]) -> Buckets:
    observed = Histogram("mace:t", "t", buckets=buckets, registry=CollectorRegistry())
    for value in values:
        observed.observe(value)
    return Buckets.read(observed)


def test_percentiles_interpolate_within_buckets() -> None:
    buckets = histogram([0.015] * 50 + [0.03] * 40 + [0.09] * 10, (0.01, 0.02, 0.04, 0.1))
    assert buckets.total == 100
    assert buckets.quantile(0.5) == pytest.approx(0.02)  # the 50th of 100 closes the (0.01, 0.02] bucket
    assert buckets.quantile(0.25) == pytest.approx(0.015)
    assert buckets.quantile(0.9) == pytest.approx(0.04)
    assert buckets.quantile(0.99) == pytest.approx(0.04 + 0.06 * 0.9)
    assert histogram([], (0.1,)).quantile(0.5) is None
    assert histogram([5.0], (0.1, 1.0)).quantile(0.99) == 1.0  # beyond the last bound: that bound


def test_a_window_counts_only_what_happened_in_it() -> None:
    older = histogram([0.015] * 10, (0.01, 0.02, 0.04))
    newer = histogram([0.015] * 10 + [0.03] * 4, (0.01, 0.02, 0.04))
    window = newer.minus(older)
    assert window.total == 4
    assert window.quantile(0.5) == pytest.approx(0.03)


async def stats(http: aiohttp.ClientSession, url: str, query: str = "") -> dict[str, object]:
    async with http.get(f"{url}/v1/stats{query}") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        body: dict[str, object] = await response.json()
        return body


async def test_stats_report_the_engine(server: RunningServer, http: aiohttp.ClientSession) -> None:
    await stats(http, server.url)
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "ignore_eos": True}
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200

    async def counted() -> bool:  # the ring keeps a snapshot at most every 0.2 s
        latency = (await stats(http, server.url))["latency"]
        assert isinstance(latency, dict)
        return bool(latency["num_first_tokens"] >= 1)

    await wait_until(counted, timeout_s=5, what="the request in the stats window")
    report = await stats(http, server.url, "?window_s=60")
    assert report["object"] == "stats" and report["model"] == "builtin:tiny" and report["ready"] is True
    latency = report["latency"]
    assert isinstance(latency, dict)
    assert latency["num_first_tokens"] >= 1 and latency["num_next_tokens"] >= 19
    assert 0 < latency["ttft_s"]["p50"] <= latency["ttft_s"]["p99"]
    assert 0 < latency["tpot_s"]["p50"] <= latency["tpot_s"]["p90"] <= latency["tpot_s"]["p99"]
    tokens_per_s = report["generation_tokens_per_s"]
    assert isinstance(tokens_per_s, float) and tokens_per_s > 0 and math.isfinite(tokens_per_s)
    assert report["requests"] == {"running": 0, "waiting": 0, "preemptions": 0}
    kv = report["kv"]
    assert isinstance(kv, dict) and kv["budget_bytes"] > 0 and 0 <= kv["usage"] <= 1
    assert report["train"] is None  # this server runs no retraining policy
    assert report["adapters"] == {"active": 0, "auto_publish": False, "versions": []}


@pytest.mark.parametrize("window", ["0", "abc", "1000"])
async def test_a_bad_window_is_refused(server: RunningServer, http: aiohttp.ClientSession, window: str) -> None:
    async with http.get(f"{server.url}/v1/stats?window_s={window}") as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "window_s"


async def test_pages_and_assets_are_served_with_their_headers(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    for path, kind in [("/", "text/html"), ("/dashboard", "text/html"), ("/static/chat.js", "javascript"),
                       ("/static/style.css", "text/css")]:
        async with http.get(server.url + path) as response:
            assert response.status == 200, path
            assert kind in response.headers["Content-Type"]
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    for path in ["/static/missing.js", "/static/..%2Fpages.py", "/static/.hidden.js"]:
        async with http.get(server.url + path) as response:
            assert response.status == 404, path
