"""SLO scheduling under overload: mace's scheduler (earliest deadline first, chunked prefill sized to
the TPOT target, 429 for requests predicted to miss their TTFT) against first-come-first-served, on
the same seeded trace.

1. The server's capacity is measured in a closed loop (requests completed per second at saturation).
2. For each scheduler and each load (a multiple of that capacity), Poisson arrivals of short chats,
   a mix of `interactive` and `batch` SLO classes, run for `--seconds`.
3. It prints, per run: requests offered and shed, SLO attainment of the admitted requests per class,
   goodput (requests meeting all their SLOs per second) and interactive TTFT p50/p99.

    make bench-slo                       # default model, loads 1.5x and 3x
    python benchmarks/slo.py --model builtin:tiny --seconds 10   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from mace.config import SloConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import PROMPTS, Server, free_port, scrape_metrics

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {name: (SloConfig().target(name).ttft_s, SloConfig().target(name).tpot_s)  # the default classes
           for name in SloConfig().class_names}


@dataclass
class Outcome:
    slo_class: str
    status: int  # HTTP status; 0 when the connection or the stream failed
    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def admitted(self) -> bool:
        return self.status == 200 and self.ttft_s is not None

    def meets(self, kind: str) -> bool:
        ttft_target, tpot_target = TARGETS[self.slo_class]
        if not self.admitted or self.ttft_s is None:
            return False
        ttft_ok = self.ttft_s <= ttft_target
        tpot_ok = self.tpot_s is None or self.tpot_s <= tpot_target
        return {"ttft": ttft_ok, "tpot": tpot_ok, "all": ttft_ok and tpot_ok}[kind]


MODEL = {"name": "builtin:smollm2"}  # what requests ask for: the served model (set by main)


async def one_request(session: aiohttp.ClientSession, url: str, slo_class: str, prompt: str,
                      max_tokens: int) -> Outcome:
    body = {"model": MODEL["name"], "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "mace_slo": slo_class, "ignore_eos": True}
    started = time.perf_counter()
    token_times: list[float] = []
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                await response.read()
                return Outcome(slo_class, response.status)
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: {") and '"content"' in line:
                    event = json.loads(line[len("data: "):])
                    if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                        token_times.append(time.perf_counter())
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(slo_class, 0)
    if not token_times:
        return Outcome(slo_class, 0)
    tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else None
    return Outcome(slo_class, 200, token_times[0] - started, tpot)


async def measure_capacity(base_url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    """Requests completed per second by `concurrency` closed-loop clients (all `batch`: nothing is shed)."""
    url = base_url + "/v1/chat/completions"
    deadline = time.monotonic() + seconds
    done = 0

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        turn = 0
        while time.monotonic() < deadline:
            prompt = PROMPTS[(index * 7 + turn) % len(PROMPTS)]
            if (await one_request(session, url, "batch", prompt, max_tokens)).admitted:
                done += 1
            turn += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return done / (time.monotonic() - started)


async def open_loop(base_url: str, rate: float, seconds: float, seed: int, interactive_share: float,
                    max_tokens: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals for `seconds`; waits for the stragglers (bounded) and returns every outcome."""
    rng = random.Random(seed)
    url = base_url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=seconds + 120)
    tasks: list[asyncio.Task[Outcome]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        started = time.monotonic()
        at = 0.0
        while at < seconds:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            slo_class = "interactive" if rng.random() < interactive_share else "batch"
            prompt = rng.choice(PROMPTS)
            tasks.append(asyncio.create_task(one_request(session, url, slo_class, prompt, max_tokens)))
            at += rng.expovariate(rate)
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, time.monotonic() - started


def _share(admitted: list[Outcome], kind: str) -> float:
    return sum(o.meets(kind) for o in admitted) / len(admitted)


def report(name: str, load: float, rate: float, outcomes: list[Outcome], elapsed_s: float) -> str:
    shed = sum(o.status == 429 for o in outcomes)
    failed = sum(o.status not in (200, 429) for o in outcomes)
    cells = [name, f"{load:g}x ({rate:.2f}/s)", str(len(outcomes)), f"{shed} / {failed}"]
    for slo_class in TARGETS:
        admitted = [o for o in outcomes if o.slo_class == slo_class and o.admitted]
        cells.append(f"{_share(admitted, 'all'):.1%} ({_share(admitted, 'ttft'):.0%} / "
                     f"{_share(admitted, 'tpot'):.0%}), n={len(admitted)}" if admitted else "-")
    goodput = sum(o.meets("all") for o in outcomes) / elapsed_s
    ttfts = sorted(o.ttft_s for o in outcomes if o.slo_class == "interactive" and o.ttft_s is not None)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None
    cells += [f"{goodput:.2f}", f"{statistics.median(ttfts):.2f} / {p99:.2f}" if p99 is not None else "-"]
    return "| " + " | ".join(cells) + " |"


async def print_decode_cap(base_url: str, when: str) -> None:
    """The SLO decode cap the server's latency model sets now: it is fitted at each start and refitted as
    steps are measured, and under "slo" it bounds how many requests decode together."""
    series = await scrape_metrics(base_url, ("mace:decode_cap",))
    print(f"decode cap, {when}: {series.get('mace:decode_cap') if series else 'n/a'}", flush=True)


async def run_scheduler(args: argparse.Namespace, scheduling: str, capacity: float | None) -> tuple[float, list[str]]:
    port = free_port()
    argv = [sys.executable, "-m", "mace.cli", "serve", "--config", str(ROOT / "configs" / "default.toml"),
            "--model", args.model, "--host", "127.0.0.1", "--port", str(port)]
    env = {"MACE_ENGINE__SCHEDULING": scheduling, "MACE_TRAIN__POLICY": "none",
           "MACE_DATA_DIR": str(Path(args.workdir) / scheduling)}
    rows = []
    with Server(f"mace-{scheduling}", argv, env, port, "/ready") as server:
        await server.wait_ready(600)
        await print_decode_cap(server.base_url, f"{scheduling}: after warm-up")
        if capacity is None:
            capacity = await measure_capacity(server.base_url, args.concurrency, args.capacity_seconds,
                                              args.max_tokens)
            print(f"capacity: {capacity:.2f} requests/s ({args.concurrency} closed-loop clients, "
                  f"{args.max_tokens} tokens each)", flush=True)
        for load in args.loads:
            rate = load * capacity
            outcomes, elapsed = await open_loop(server.base_url, rate, args.seconds, args.seed,
                                                args.interactive_share, args.max_tokens)
            rows.append(report(scheduling, load, rate, outcomes, elapsed))
            print(rows[-1], flush=True)
            await print_decode_cap(server.base_url, f"{scheduling}: after {load:g}x")
            await asyncio.sleep(args.cooldown)  # the queue of the last run drains before the next
    return capacity, rows


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[1.5, 3.0])
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals per run")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--schedulers", type=lambda text: text.split(","), default=["slo", "fcfs"],
                        help="comma-separated; the first one measures the capacity unless --capacity is given")
    parser.add_argument("--capacity", type=float, help="requests/s to scale the loads by, instead of measuring it "
                        "(the measurement depends on the decode cap that start's warm-up fitted)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the capacity")
    parser.add_argument("--interactive-share", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cooldown", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/mace-bench-slo")
    args = parser.parse_args(argv)
    MODEL["name"] = args.model
    header = ("| scheduler | load | requests | shed / failed | interactive attainment (ttft / tpot) "
              "| batch attainment (ttft / tpot) | goodput (req/s) | interactive TTFT p50 / p99 (s) |")
    print(header + "\n|---|---|---|---|---|---|---|---|", flush=True)
    capacity, rows = args.capacity, []
    for scheduling in args.schedulers:
        capacity, more = await run_scheduler(args, scheduling, capacity)
        rows += more
    table = [header, "|---|---|---|---|---|---|---|---|", *rows]
    print("\n" + "\n".join(table))
    print(f"\nSLO targets: interactive TTFT {TARGETS['interactive'][0]}s TPOT {TARGETS['interactive'][1]}s, "
          f"batch TTFT {TARGETS['batch'][0]}s TPOT {TARGETS['batch'][1]}s; attainment over admitted requests.")
    return table


if __name__ == "__main__":
    asyncio.run(main())
