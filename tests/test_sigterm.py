"""SIGTERM on a real `mace serve`: admission closes (503), running streams finish within the drain
timeout, the trainer is checkpointed, and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.test_cli import free_port, mace, wait_ready


def start(tmp_path: Path, drain_timeout_s: float) -> tuple[int, subprocess.Popen[bytes]]:
    env = {**os.environ, "MACE_CACHE_DIR": str(tmp_path / "cache"), "MACE_DATA_DIR": str(tmp_path / "data"),
           "MACE_TRAIN__POLICY": "continuous", "MACE_TRAIN__CHECKPOINT_INTERVAL_S": "3600",
           "MACE_SERVER__DRAIN_TIMEOUT_S": str(drain_timeout_s)}
    port = free_port()
    process = mace("serve", "--config", "configs/tiny.toml", "--port", str(port), env=env, log=tmp_path / "serve.log")
    wait_ready(port, process)
    return port, process


class Stream(threading.Thread):
    """A streaming chat read line by line; `started` is set at the first event."""

    def __init__(self, port: int, max_tokens: int) -> None:
        super().__init__(daemon=True)
        body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": max_tokens, "ignore_eos": True}
        self.request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                              data=json.dumps(body).encode(),
                                              headers={"Content-Type": "application/json"})
        self.started = threading.Event()
        self.lines: list[str] = []

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=60) as response:
                for raw in response:
                    self.lines.append(raw.decode().strip())
                    self.started.set()
        except (OSError, ValueError):  # cut by the server: what was read stays in `lines`
            pass
        self.started.set()

    @property
    def finished(self) -> bool:
        return "data: [DONE]" in self.lines and any('"finish_reason":"length"' in line for line in self.lines)


def status_of(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        assert exc.headers.get("Retry-After") is not None or exc.code != 503
        return exc.code


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_drains_checkpoints_and_exits_0(tmp_path: Path) -> None:
    port, process = start(tmp_path, drain_timeout_s=60)
    stream = Stream(port, max_tokens=300)
    try:
        stream.start()
        assert stream.started.wait(30)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: status_of(port, "/v1/models") == 503, 10, "admission to close")
        assert status_of(port, "/health") == 200
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stream.join(10)
    assert stream.finished, stream.lines[-3:]  # the running stream was let finish
    assert (tmp_path / "data" / "checkpoints" / "learner.pt").is_file()
    log = (tmp_path / "serve.log").read_text()
    assert '"event":"draining"' in log and '"event":"stopped"' in log


def test_drain_is_bounded(tmp_path: Path) -> None:
    port, process = start(tmp_path, drain_timeout_s=0.5)
    stream = Stream(port, max_tokens=1000)  # far longer than the drain allows
    try:
        stream.start()
        assert stream.started.wait(30)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stream.join(10)
    assert not stream.finished  # cut at the deadline, not waited for
    assert time.monotonic() - signalled < 30
    assert (tmp_path / "data" / "checkpoints" / "learner.pt").is_file()
    assert '"event":"drain timed out' in (tmp_path / "serve.log").read_text()
