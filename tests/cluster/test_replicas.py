"""`mace serve --replicas 2` on a local Ray cluster, as a user runs it: the OpenAI SDK and the
websocket through one port, requests on both replicas, every replica's metrics, tenants isolated, and
a tenant whose replica is killed with -9 served by the other, with its taught version, every
acknowledged sample still in the journal. Without Ray, --replicas says why it cannot start."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.test_cli import free_port, mace, wait_ready
from tests.train.test_learning import QUESTION, TRAIN

START_TIMEOUT_S = 180  # Ray, two replicas' model loads and warm-ups, on two cores


@dataclass
class Cluster:
    port: int
    data: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    port = free_port()
    env = {**os.environ, "MACE_CACHE_DIR": str(tmp / "cache"), "MACE_DATA_DIR": str(tmp / "data"),
           "MACE_TRAIN__POLICY": "mace", **{f"MACE_TRAIN__{key.upper()}": str(value) for key, value in TRAIN.items()}}
    process = mace("serve", "--config", "configs/tiny.toml", "--port", str(port), "--replicas", "2",
                   env=env, log=tmp / "cluster.log")
    try:
        wait_ready(port, process, timeout_s=START_TIMEOUT_S)
        yield Cluster(port, tmp / "data", process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=120) == 0
        finally:
            if process.poll() is None:
                process.kill()


def _post(cluster: Cluster, path: str, body: object) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(cluster.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, dict(response.headers), json.load(response)


def _get(cluster: Cluster, path: str) -> Any:
    with urllib.request.urlopen(cluster.url + path, timeout=30) as response:
        return json.load(response)


def _ask(cluster: Cluster, user: str) -> tuple[str, int, str]:
    """(answer, adapter version, replica) of a greedy answer to the test question, as `user`."""
    _, headers, reply = _post(cluster, "/v1/chat/completions", {
        "model": "builtin:tiny", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "user": user})
    version = int(reply["system_fingerprint"].rsplit("v", 1)[1])
    return reply["choices"][0]["message"]["content"], version, headers["X-Mace-Replica"]


def _ask_replica(address: str, user: str) -> tuple[str, int]:
    """The same, asked of one replica's own server (its private address), past the front end's routing."""
    request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=json.dumps({
        "model": "builtin:tiny", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "user": user}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.load(response)
    return reply["choices"][0]["message"]["content"], int(reply["system_fingerprint"].rsplit("v", 1)[1])


def test_the_openai_sdk_works_unchanged_and_both_replicas_answer(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    replicas = {entry["replica"] for entry in _get(cluster, "/cluster/replicas")["data"] if entry["ready"]}
    assert len(replicas) == 2
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused") as sdk:
        from concurrent.futures import ThreadPoolExecutor

        def one(n: int) -> str:
            raw = sdk.chat.completions.with_raw_response.create(
                model="builtin:tiny", messages=[{"role": "user", "content": f"count {n}"}], max_tokens=16)
            return raw.headers["X-Mace-Replica"]

        with ThreadPoolExecutor(16) as pool:
            while seen != replicas:  # requests without a tenant spread by load
                assert time.monotonic() < deadline, f"both replicas to answer (seen {seen} of {replicas})"
                seen |= set(pool.map(one, range(16)))


async def test_websocket_chat_through_the_front_end(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(cluster.url + "/v1/ws") as ws:
        await ws.send_json({"type": "chat", "id": "one", "messages": QUESTION, "max_tokens": 4, "ignore_eos": True})
        while (message := await ws.receive_json(timeout=60))["type"] == "delta":
            assert message["id"] == "one"
        assert message["type"] == "done" and message["usage"]["completion_tokens"] == 4


def test_metrics_carry_every_replica(cluster: Cluster) -> None:
    _ask(cluster, "metrics-probe")
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    listed = _get(cluster, "/cluster/replicas")["data"]
    for entry in listed:
        assert f'replica="{entry["replica"]}"' in text
        assert entry["ready"] and entry["running"] is not None and 0 <= entry["kv_usage"] <= 1  # its load
    assert text.count("# TYPE mace:time_to_first_token_seconds histogram") == 1  # one family, every replica's samples


def _untrained_or_missing(data: Path, user: str, ids: list[int]) -> int:
    with sqlite3.connect(data / "journal.sqlite3") as journal:
        rows = journal.execute(f"SELECT id FROM samples WHERE tenant = ? AND id IN ({','.join('?' * len(ids))})",
                               (user, *ids)).fetchall()
    return len(ids) - len(rows)


def test_a_tenant_moves_with_its_version_when_its_replica_is_killed(cluster: Cluster) -> None:
    before_bob = _ask(cluster, "bob")
    _ask(cluster, "alice")  # alice's lineage is read, and its lease taken, by the replica Serve picks for her
    samples = [{"user": "alice", "messages": [*QUESTION, {"role": "assistant", "content": "zebra"}]}] * 8
    status, _, accepted = _post(cluster, "/v1/feedback", samples)
    assert status == 202
    ids = accepted["ids"]
    deadline = time.monotonic() + 240
    while _get(cluster, "/v1/adapters?user=alice")["active"] < 1:
        assert time.monotonic() < deadline, "alice's replica to publish a version"
        time.sleep(0.5)
    # The owner trains and publishes; the other replica follows within its poll and may answer meanwhile.
    owner_pid = int((cluster.data / "tenants" / "alice" / "OWNER").read_text().rsplit(" pid ", 1)[1])
    replicas = _get(cluster, "/cluster/replicas")["data"]
    holder = next(entry["replica"] for entry in replicas if entry["pid"] == owner_pid)
    taught, version = _ask_replica(next(e["address"] for e in replicas if e["replica"] == holder), "alice")
    assert version >= 1
    # On both replicas, the one that trains alice and the one that follows her: bob's answer and version
    # are his own, and alice's follower serves her owner's version.
    for replica in replicas:
        assert _ask_replica(replica["address"], "bob") == before_bob[:2]
        deadline = time.monotonic() + 30
        while _ask_replica(replica["address"], "alice")[1] < version:
            assert time.monotonic() < deadline, "every replica to serve alice's published version"
            time.sleep(0.5)

    os.kill(owner_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        try:
            answer, served_version, replica = _ask(cluster, "alice")
        except urllib.error.HTTPError as exc:  # 503 while no replica could answer: ask again
            assert exc.code == 503
        else:
            if replica != holder and served_version >= version:
                break
        assert time.monotonic() - killed_at < 30, "another replica to serve alice's taught version"
        time.sleep(0.5)
    if served_version == version:  # a newer one may have been published since, from samples still untrained
        assert answer == taught  # the same version's greedy answer, from the other replica
    assert _untrained_or_missing(cluster.data, "alice", ids) == 0  # every acknowledged sample is in the journal
    assert _ask(cluster, "bob")[:2] == before_bob[:2]


def test_without_ray_replicas_say_why_and_exit(tmp_path: Path) -> None:
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray (hidden by the test)')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MACE_DATA_DIR": str(tmp_path / "data"), "MACE_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "log"
    process = mace("serve", "--config", "configs/tiny.toml", "--port", str(free_port()), "--replicas", "2",
                   env=env, log=log)
    assert process.wait(timeout=60) == 2
    assert "--replicas needs Ray Serve" in log.read_text()
