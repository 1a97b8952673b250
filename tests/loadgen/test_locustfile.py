"""loadgen/locustfile.py run by locust itself, headless for a few seconds, against the tiny mace server.

Locust runs in a child process: it monkey-patches the standard library with gevent, which must not
happen inside the test process (its event loop serves the tiny server meanwhile).
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STREAM = ("POST", "/v1/chat/completions (stream)")
TTFT = ("TTFT", "/v1/chat/completions")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (it is a dev extra: make install)")


async def test_locustfile_times_whole_streams_and_ttft(tiny_url: str, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadgen" / "locustfile.py"), "--headless",
               "--users", "2", "--spawn-rate", "2", "--run-time", "4s", "--stop-timeout", "20",
               "--host", tiny_url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    process = await asyncio.create_subprocess_exec(*command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    log = output.decode(errors="replace")
    assert process.returncode == 0, log  # locust exits 1 when any request failed

    with (tmp_path / "locust_stats.csv").open() as handle:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    stream, ttft = rows[STREAM], rows[TTFT]
    assert int(stream["Request Count"]) >= 2 and int(stream["Failure Count"]) == 0, log
    assert int(ttft["Request Count"]) == int(stream["Request Count"])  # one TTFT per successful stream
    # Each stream's entry ends after its first token: it is the whole stream, not the response headers.
    assert float(stream["Average Response Time"]) > float(ttft["Average Response Time"])
    assert float(stream["Min Response Time"]) > float(ttft["Min Response Time"])
    assert float(stream["Average Content Size"]) > 0
