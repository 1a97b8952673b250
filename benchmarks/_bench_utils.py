"""Helpers for benchmarks/serving.py: the prompts, server subprocesses and the streaming HTTP client."""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# Short, varied questions: different prompt lengths so no system benefits from identical inputs.
PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "How do vaccines work?",
    "What does HTTP stand for?",
    "Name the planets of the solar system.",
    "What is a prime number?",
    "Summarise the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "What causes the seasons on Earth?",
    "Suggest a name for a pet goldfish.",
    "What is the boiling point of water at sea level?",
    "How does a refrigerator keep food cold?",
    "What is machine learning?",
    "Translate 'good morning' into Spanish.",
    "Who wrote 'Pride and Prejudice'?",
    "What is the tallest mountain in the world?",
    "Describe a rainbow to someone who has never seen one.",
    "What is the Pythagorean theorem?",
    "List three renewable sources of energy.",
    "How do bees make honey?",
    "What is the speed of light?",
    "Give me a simple recipe for pancakes.",
    "What is inflation in economics?",
    "Why do cats purr?",
    "What is the largest ocean on Earth?",
    "How does a compass work?",
    "What is the meaning of the word 'ephemeral'?",
    "Recommend a good habit for learning a new language.",
]


def free_port() -> int:
    """A loopback port nobody listens on right now (the tiny race with other processes is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server subprocess: started in its own process group so stopping it also stops its children."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str) -> None:
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.env = {**os.environ, **env}
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop()
        if exc_type is None and not os.environ.get("MACE_BENCH_KEEP_LOGS"):  # kept when something went wrong
            self.log.unlink(missing_ok=True)
        else:
            print(f"{self.name} log: {self.log}", file=sys.stderr)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"{self.name} exited with {code} (see its log)\n{self.log_tail()}")
                url, short = self.base_url + self.ready_path, aiohttp.ClientTimeout(2)
                try:
                    async with session.get(url, timeout=short) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s (see its log)\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM first so the server can shut down cleanly; SIGKILL the group if it lingers.
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class LoadResult:
    seconds: float
    tokens: list[int] = field(default_factory=list)  # completion tokens per request

    @property
    def tok_per_s(self) -> float:
        return sum(self.tokens) / self.seconds


async def timed_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, float]:
    """Stream one chat completion: (completion tokens, its TPOT: first to last content chunk per token)."""
    chunks, usage, first, last = 0, None, math.nan, math.nan
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any((choice.get("delta") or {}).get("content") for choice in event.get("choices") or []):
                chunks += 1
                last = time.perf_counter()
                first = last if math.isnan(first) else first
    tokens = int(usage) if usage is not None else chunks
    return tokens, (last - first) / (tokens - 1) if tokens > 1 else math.nan


async def _one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """Stream one chat completion; return its completion tokens (server's usage, else the content chunks)."""
    return (await timed_request(session, url, body))[0]


async def drive(base_url: str, bodies: list[dict[str, Any]], timeout_s: float = 1800) -> LoadResult:
    """Send all bodies at once (concurrency = len(bodies)) and time until the last stream ends."""
    url = base_url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the server must see every request
    timeout = aiohttp.ClientTimeout(timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(_one_request(session, url, b) for b in bodies))
        return LoadResult(time.perf_counter() - start, list(tokens))


async def scrape_metrics(base_url: str, names: tuple[str, ...]) -> dict[str, float] | None:
    """Sum of each named Prometheus series (over labels), or None when /metrics is missing."""
    try:
        async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        metric, _, value = line.rpartition(" ")
        base = metric.split("{", 1)[0]
        if base in names:
            found[base] = found.get(base, 0.0) + float(value)
    return found


class CpuContention:
    """CPU seconds that processes other than this one and its servers used while the benchmark ran.

    The machine is shared; with 2 cores, anything else running makes OpenMP threads wait on each other and
    numbers swing several-fold, so the table says how busy the machine was instead of leaving that hidden.
    """

    @staticmethod
    def _machine_busy_s() -> float:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours_s() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __init__(self) -> None:
        self.start_wall = time.monotonic()
        self.start_busy, self.start_ours = self._machine_busy_s(), self._ours_s()

    def report(self) -> str:
        wall = time.monotonic() - self.start_wall
        others = max(0.0, (self._machine_busy_s() - self.start_busy) - (self._ours_s() - self.start_ours))
        share = others / (wall * (os.cpu_count() or 1))
        return f"other processes used {others:.0f} CPU-s over {wall:.0f} s ({share:.0%} of the machine)"
