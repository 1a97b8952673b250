"""`mace serve` as a user runs it: a real subprocess on a loopback port, stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mace(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:  # a file, not a pipe: a chatty server can never block on a full pipe
        return subprocess.Popen([sys.executable, "-m", "mace.cli", *args], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def test_serve_flags_override_config_and_answer(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MACE_CACHE_DIR": str(tmp_path), "MACE_DATA_DIR": str(tmp_path / "data"),
           "MACE_SERVER__PORT": "1"}  # the --port flag must win over the environment
    flags = ["--model", "builtin:tiny", "--port", str(port), "--dtype", "float32", "--device", "cpu"]
    process = mace("serve", "--config", "configs/default.toml", *flags, env=env, log=tmp_path / "serve.log")
    try:
        wait_ready(port, process)
        body = json.dumps({"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.load(response)
        assert reply["usage"]["completion_tokens"] <= 3
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 0
    # one structured summary line per request
    assert '"event":"request"' in (tmp_path / "serve.log").read_text()


def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    env = {**os.environ, "MACE_ENGINE__MAX_NUM_SEQS": "zero"}
    log = tmp_path / "serve.log"
    process = mace("serve", "--config", "configs/tiny.toml", env=env, log=log)
    assert process.wait(timeout=60) == 2
    stderr = log.read_bytes()
    assert b"engine.max_num_seqs" in stderr and b"MACE_ENGINE__MAX_NUM_SEQS" in stderr
