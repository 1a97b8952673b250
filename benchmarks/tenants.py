"""Bringing an evicted tenant back: its request's TTFT, and the TPOT of a stream running beside it.

Before the server starts, `--tenants` tenants each get a published version 1 of random LoRA weights on
disk (what their gates would have left there), and `mace serve` runs the default model with
`train.max_resident_tenants = 2`. One streaming chat request of the shared lineage runs throughout.
Then, round by round, each tenant asks one short question twice in a row: the first request finds
its lineage on disk (the two most recent of the others are resident) and brings it back, the second
finds it in memory. Both answers must carry the tenant's version 1. Prints the TTFT of cold and warm
requests and the background stream's inter-token gaps while a cold request waited for its first token
against those while a warm one did (each wait has a prefill in it). Never fails on speed.

    .venv/bin/python benchmarks/tenants.py [--tenants 6] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

from _bench_utils import Server, free_port
from mace.config import load_config
from mace.model.loader import load_model
from mace.tenancy import tenant_dir
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.learner import Learner, save_adapter
from mace.train.writer import DiskWriter

QUESTION = [{"role": "user", "content": "What is my cat called?"}]


def publish_on_disk(data_dir: Path, tenants: list[str]) -> None:
    """Version 1 of random weights for each tenant, written as its gate would have."""
    config = load_config(overrides={"data_dir": str(data_dir)})
    bundle = load_model(config.model, config.cache_dir)
    learner = Learner(bundle.causal_lm, config.train)
    writer = DiskWriter()
    generator = torch.Generator().manual_seed(0)
    for tenant in tenants:
        with torch.no_grad():
            for param in learner._learner_params():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        learner.publish(1, tenant=tenant)
        weights = learner.version_weights(1, tenant)
        store = AdapterStore(tenant_dir(data_dir, tenant) / "adapters", writer)
        store.write(AdapterVersion(1, store.now(), None, None, 0, "benchmark"),
                    lambda directory, w=weights: save_adapter(directory, w, learner.lora_config))
        store.set_active(1)
    writer.close()


async def ask(session: aiohttp.ClientSession, url: str, user: str) -> tuple[float, int]:
    body = {"model": "builtin:smollm2", "messages": QUESTION, "max_tokens": 2, "temperature": 0,
            "stream": True, "user": user}
    started = time.monotonic()
    ttft = None
    version = -1
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {") and ttft is None and b'"content":"' in line:
                ttft = time.monotonic() - started
            if b"mace-adapter-v" in line:
                version = int(line.split(b"mace-adapter-v")[1].split(b'"')[0])
    assert ttft is not None
    return ttft, version


async def background(session: aiohttp.ClientSession, url: str, gaps: list[tuple[float, float]],
                     stop: asyncio.Event) -> None:
    body = {"model": "builtin:smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    while not stop.is_set():
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            last = None
            async for line in response.content:
                now = time.monotonic()
                if line.startswith(b"data: {"):
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
                if stop.is_set():
                    break


async def run(args: argparse.Namespace) -> None:
    tenants = [f"tenant-{i}" for i in range(args.tenants)]
    with tempfile.TemporaryDirectory(prefix="mace-bench-tenants-") as tmp:
        data = Path(tmp) / "data"
        publish_on_disk(data, tenants)
        port = free_port()
        env = {"MACE_DATA_DIR": str(data), "MACE_TRAIN__MAX_RESIDENT_TENANTS": "2"}
        argv = [str(Path(sys.executable).parent / "mace"), "serve", "--port", str(port)]
        with Server("mace", argv, env, port, "/ready") as server:
            await server.wait_ready(600)
            url = server.base_url
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                for tenant in tenants[:2]:
                    await ask(session, url, tenant)  # warm-up: the first requests also compile paths
                gaps: list[tuple[float, float]] = []
                stop = asyncio.Event()
                stream = asyncio.create_task(background(session, url, gaps, stop))
                await asyncio.sleep(3)
                cold, warm, cold_windows, warm_windows = [], [], [], []
                for _ in range(args.rounds):
                    for tenant in tenants:
                        started = time.monotonic()
                        ttft, version = await ask(session, url, tenant)
                        cold_windows.append((started, started + ttft))
                        assert version == 1, f"{tenant} was served version {version}"
                        cold.append(ttft)
                        started = time.monotonic()
                        ttft, version = await ask(session, url, tenant)
                        warm_windows.append((started, started + ttft))
                        assert version == 1
                        warm.append(ttft)
                stop.set()
                await stream
    def within(windows: list[tuple[float, float]]) -> list[float]:
        """Gaps that overlap a request's wait for its first token (its prefill rides in those steps)."""
        return [gap for at, gap in gaps if any(start <= at <= end + gap for start, end in windows)]

    during, beside_warm = within(cold_windows), within(warm_windows)

    def ms(values: list[float], q: float) -> str:
        return f"{1000 * statistics.quantiles(values, n=100)[int(q) - 1]:.0f}" if len(values) > 2 else "-"

    print(f"{args.tenants} tenants, 2 resident, {args.rounds} rounds, default model, one background stream\n")
    print("| request | n | TTFT p50 ms | TTFT p90 ms |")
    print("|---|---|---|---|")
    print(f"| tenant on disk (brought back) | {len(cold)} | {ms(cold, 50)} | {ms(cold, 90)} |")
    print(f"| tenant in memory | {len(warm)} | {ms(warm, 50)} | {ms(warm, 90)} |")
    print(f"\nTTFT added by bringing a tenant back, p50: "
          f"{1000 * (statistics.median(cold) - statistics.median(warm)):.0f} ms\n")
    print("| background stream's gaps | n | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    print(f"| while a tenant on disk waited for its first token | {len(during)} | {ms(during, 50)} "
          f"| {ms(during, 99)} |")
    print(f"| while a tenant in memory did | {len(beside_warm)} | {ms(beside_warm, 50)} | {ms(beside_warm, 99)} |")
    every = [gap for _, gap in gaps]
    print(f"| the whole run | {len(every)} | {ms(every, 50)} | {ms(every, 99)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
