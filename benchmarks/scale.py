"""One server against `mace serve --replicas N` on this machine: throughput at a concurrency, then a
capacity model per device count from the measured single-device figures.

    .venv/bin/python benchmarks/scale.py                       # 1 vs 2 replicas, 32 concurrent
    .venv/bin/python benchmarks/scale.py --replicas 2 --concurrency 32 --rounds 2

Every server runs the default model with training off (serving only, as the throughput compared),
one after another, alone. The capacity model multiplies one replica's measured tokens/s by the device
count: replicas share nothing on the serving path (each its own model, KV and engine; the front end
only relays), so it is linear up to what the front end and the journal absorb, which are measured
here too (the front end's relay overhead per request, the journal's acknowledged samples per second).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_utils import PROMPTS, Server, drive, free_port

MODEL = "builtin:smollm2"


def bodies(count: int, new_tokens: int) -> list[dict[str, Any]]:
    return [{"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
             "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for i in range(count)]


async def throughput(server: Server, concurrency: int, rounds: int, new_tokens: int) -> float:
    await drive(server.base_url, bodies(min(concurrency, 4), 8))  # one warm round: first kernels, pools
    total_tokens, total_s = 0, 0.0
    for _ in range(rounds):
        result = await drive(server.base_url, bodies(concurrency, new_tokens))
        total_tokens += sum(result.tokens)
        total_s += result.seconds
    return total_tokens / total_s


async def relay_overhead_ms(server: Server, samples: int = 40) -> float:
    """Median wall time of GET /v1/models: the API's cheapest route, through the front end or not."""
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(samples):
            started = time.perf_counter()
            async with session.get(server.base_url + "/v1/models") as response:
                await response.read()
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


async def journal_samples_per_s(server: Server, batches: int = 20, per_batch: int = 32) -> float:
    """Acknowledged feedback samples per second, batches of `per_batch` sent 4 at a time."""
    body = [{"messages": [{"role": "user", "content": f"Question {n}?"},
                          {"role": "assistant", "content": f"Answer {n}."}]} for n in range(per_batch)]
    async with aiohttp.ClientSession() as session:
        async def post() -> None:
            async with session.post(server.base_url + "/v1/feedback", json=body) as response:
                assert response.status == 202, await response.text()

        started = time.perf_counter()
        for _ in range(batches // 4):
            await asyncio.gather(*(post() for _ in range(4)))
        return batches // 4 * 4 * per_batch / (time.perf_counter() - started)


def server(replicas: int, data_dir: str, policy: str = "none") -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "mace.cli", "serve", "--model", MODEL, "--port", str(port)]
    if replicas > 1:
        argv += ["--replicas", str(replicas)]
    env = {"MACE_DATA_DIR": data_dir, "MACE_TRAIN__POLICY": policy}
    return Server(f"mace-{replicas}", argv, env, port, "/ready")


async def measure(replicas: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mace-scale-") as data_dir, server(replicas, data_dir) as running:
        await running.wait_ready(600)
        figures = {"tok_s": await throughput(running, args.concurrency, args.rounds, args.new_tokens),
                   "relay_ms": await relay_overhead_ms(running),
                   "journal_samples_s": await journal_samples_per_s(running)}
    print(f"{replicas} replica(s): {figures['tok_s']:.1f} tok/s at {args.concurrency} concurrent, "
          f"GET /v1/models p50 {figures['relay_ms']:.2f} ms, journal {figures['journal_samples_s']:.0f} samples/s",
          flush=True)
    return figures


def capacity_table(one: dict[str, float], journal_samples_s: float, resident_tenants: int) -> str:
    rows = ["| devices | tokens/s (linear in replicas) | tenants resident | feedback samples/s the journal absorbs |",
            "|---|---|---|---|"]
    for devices in (1, 2, 4, 8, 16, 32, 64):
        rows.append(f"| {devices} | {one['tok_s'] * devices:,.0f} | {resident_tenants * devices:,} | "
                    f"{journal_samples_s:,.0f} (one journal file, shared) |")
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--resident-tenants", type=int, default=16, help="train.max_resident_tenants per device")
    args = parser.parse_args()
    one = await measure(1, args)
    many = await measure(args.replicas, args)
    print(f"\n{args.replicas} replicas against 1: {many['tok_s'] / one['tok_s']:.2f}x tokens/s; the front end adds "
          f"{many['relay_ms'] - one['relay_ms']:.2f} ms to the cheapest request\n")
    print(capacity_table(one, many["journal_samples_s"], args.resident_tenants))


if __name__ == "__main__":
    asyncio.run(main())
