"""`kill -9` at several random moments under feedback load, on one data dir, with training running:
every acknowledged sample is in the journal afterwards, and the server starts again each time."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

from tests.test_cli import free_port, mace, wait_ready

NUM_KILLS = 3


def post_feedback(port: int, samples: list[dict[str, str]]) -> list[int]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/feedback", data=json.dumps(samples).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [int(i) for i in json.load(response)["ids"]]


class Feeder(threading.Thread):
    """Posts batches of 1-4 samples until the server dies; records the ids it was told were stored."""

    def __init__(self, port: int, seed: int, acknowledged: list[int]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.acknowledged = acknowledged

    def run(self) -> None:
        while True:
            batch = [{"prompt": f"q{self.rng.random()}", "completion": "answer " * self.rng.randint(1, 20)}
                     for _ in range(self.rng.randint(1, 4))]
            try:
                self.acknowledged.extend(post_feedback(self.port, batch))  # list.extend is atomic under the GIL
            except OSError:
                return


def test_kill_9_at_random_points_loses_no_acknowledged_sample(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    env = {**os.environ, "MACE_CACHE_DIR": str(tmp_path / "cache"), "MACE_DATA_DIR": str(tmp_path / "data"),
           "MACE_TRAIN__POLICY": "continuous"}  # the trainer writes to the journal too (cursor, trained counts)
    acknowledged: list[int] = []
    for round_index in range(NUM_KILLS + 1):
        port = free_port()
        process = mace("serve", "--config", "configs/tiny.toml", "--port", str(port), env=env,
                       log=tmp_path / f"serve-{round_index}.log")
        try:
            wait_ready(port, process)
            if round_index == NUM_KILLS:
                break  # the last start only proves the journal opens after the crashes
            feeders = [Feeder(port, rng.randrange(2**32), acknowledged) for _ in range(3)]
            before = len(acknowledged)
            for feeder in feeders:
                feeder.start()
            deadline = time.monotonic() + 30
            while len(acknowledged) == before:  # the load runs before the kill point
                assert time.monotonic() < deadline, "no feedback was acknowledged"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 1.5))  # the random kill point (seed {seed})
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            for feeder in feeders:
                feeder.join(30)
        finally:
            if process.poll() is None and round_index < NUM_KILLS:
                process.kill()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/feedback", timeout=30) as response:
            total = json.load(response)["total"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    journal = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
    stored = {row[0] for row in journal.execute("SELECT id FROM samples")}
    journal.close()
    lost = set(acknowledged) - stored
    assert not lost, f"seed {seed}: {len(lost)} acknowledged samples lost"
    assert total >= len(acknowledged) >= 3 * NUM_KILLS
