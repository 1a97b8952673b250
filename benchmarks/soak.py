"""Soak test (`make soak`, not in CI): N minutes of mixed streaming, websocket and feedback load with
random client disconnects and a graceful server restart (SIGTERM) halfway, against `mace serve` run
as a subprocess on 127.0.0.1. Prints requests served, errors by kind, the server's RSS and KV blocks
at start and end, and feedback samples acknowledged vs journaled. It measures; it does not judge.

    .venv/bin/python benchmarks/soak.py --minutes 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from loadgen.runner import RunConfig, Runner

from loadgen import traces

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `mace serve` subprocess at a time on a fixed port and data dir, logging to files."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, port: int) -> None:
        self.args, self.data_dir, self.port = args, data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        env = {**os.environ, "MACE_DATA_DIR": str(self.data_dir), "MACE_TRAIN__POLICY": self.args.policy}
        self.starts += 1
        with (self.data_dir.parent / f"serve-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mace.cli", "serve", "--config", self.args.config, "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"the server exited; see {log.name}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    async def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()  # SIGTERM: drain, checkpoint, exit 0
        return await asyncio.to_thread(self.process.wait, 120)

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    async def kv_blocks_used(self) -> float:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("mace:kv_cache_blocks_used "):
                    return float(line.split()[1])
        return float("nan")

    async def snapshot(self, label: str) -> str:
        return f"{label}: RSS {self.rss_mib():.0f} MiB, KV blocks used {await self.kv_blocks_used():.0f}"


async def disconnect_randomly(url: str, model: str, stop: asyncio.Event, counts: collections.Counter[str]) -> None:
    """Clients that leave mid-answer: an SSE stream or a websocket dropped after a random moment."""
    rng = random.Random(1)
    body = {"model": model, "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 200, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                if rng.random() < 0.5:
                    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                        await asyncio.wait_for(response.content.readline(), rng.uniform(0.05, 1.0))
                else:
                    async with http.ws_connect(f"{url}/v1/ws") as ws:
                        chat = {"type": "chat", "id": "x", "messages": body["messages"], "max_tokens": 200}
                        await ws.send_json(chat)
                        await asyncio.wait_for(ws.receive(), rng.uniform(0.05, 1.0))
            counts["disconnect"] += 1
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            counts["disconnect"] += 1  # leaving early is the point; a refused connect mid-restart counts too
        await asyncio.sleep(rng.uniform(0.1, 0.5))


async def soak(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mace-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    server = Server(args, work / "data", free_port())
    await server.start()
    await asyncio.sleep(2)  # the engine's first steps allocate; measure after them
    report = [await server.snapshot("start")]
    duration_s = args.minutes * 60
    spec = traces.DriftSpec(seed=0, phases=3, phase_s=max(duration_s / 3, 1), rate=4.0, feedback_fraction=0.5)
    config = RunConfig(url=server.url, users=args.users, duration_s=duration_s, model=args.model, timeout_s=60,
                       mix={"chat": 2, "completion": 1, "ws": 2, "feedback": 3}, poll_s=0)
    stop = asyncio.Event()
    disconnects: collections.Counter[str] = collections.Counter()
    chaos = asyncio.create_task(disconnect_randomly(server.url, args.model, stop, disconnects))

    async def restart_midway() -> None:
        await asyncio.sleep(duration_s / 2)
        report.append(await server.snapshot("before restart"))
        report.append(f"restart: SIGTERM exit code {await server.stop()}")
        await server.start()

    restart = asyncio.create_task(restart_midway())
    result = await Runner(config, traces.builtin("personalization", spec)).run()
    stop.set()
    await asyncio.gather(chaos, restart)
    report.append(await server.snapshot("end"))
    print(f"soak: {args.minutes} min, {args.users} users, model {args.model}, policy {args.policy}, dir {work}")
    statuses = collections.Counter(record.status for record in result.records)
    served = collections.Counter(record.kind for record in result.records if record.status == "ok")
    print(f"requests served: {sum(served.values())} ({dict(served)}); random disconnects: {disconnects['disconnect']}")
    print(f"errors by kind: {dict((k, v) for k, v in statuses.items() if k != 'ok') or 'none'}")
    examples = {(r.kind, r.status): r.error for r in result.records if r.status != "ok"}
    for (kind, status), error in sorted(examples.items()):
        count = sum(1 for r in result.records if (r.kind, r.status) == (kind, status))
        print(f"  {kind} {status} x{count}: {(error or '')[:150]}")
    print("\n".join(report))
    acknowledged = {int(i) for r in result.records if r.kind == "feedback" and r.status == "ok" and r.answer
                    for i in r.answer.split(",")}
    print(f"exit code at the end (SIGTERM): {await server.stop()}")
    journal = sqlite3.connect(work / "data" / "journal.sqlite3")
    stored = {row[0] for row in journal.execute("SELECT id FROM samples")}
    journal.close()
    print(f"feedback samples: acknowledged {len(acknowledged)}, journaled {len(stored)}, "
          f"acknowledged but missing {len(acknowledged - stored)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--model", default="builtin:tiny", help="the model name the config serves")
    parser.add_argument("--policy", default="mace", choices=["none", "periodic", "continuous", "mace"])
    parser.add_argument("--work-dir", help="data dir and server logs (a new temporary dir by default)")
    asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
