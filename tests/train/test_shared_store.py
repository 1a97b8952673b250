"""Two servers on one data dir (replicas on a shared adapter store): each lineage has one owner that
trains it and publishes its versions; the other server serves those versions, refuses to activate
them itself, and takes the lineage over, with every acknowledged sample, when the owner is gone
(stopped, or killed with -9)."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from mace.model.loader import load_model
from tests.conftest import start_server, tiny_config, wait_until
from tests.test_cli import free_port, wait_ready
from tests.train.test_learning import QUESTION, TRAIN
from tests.train.test_restart import _get, _post, _serve
from tests.train.test_tenants import ask, teach


async def _catalog(session: aiohttp.ClientSession, url: str, user: str) -> dict[str, Any]:
    async with session.get(url + "/v1/adapters", params={"user": user}) as response:
        assert response.status == 200, await response.text()
        catalog: dict[str, Any] = await response.json()
        return catalog


async def test_the_owner_trains_the_follower_serves_its_versions_and_takes_over_when_it_stops(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace"})
    owner, owner_url = await start_server(config, load_model(config.model, config.cache_dir))
    follower, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            await ask(session, owner_url, "alice")  # alice's lineage is read first by the owner: it takes her lease
            assert await ask(session, url, "alice") == await ask(session, owner_url, "alice")
            # Taught through the follower: its journal is the owner's, which scores and trains the samples.
            await teach(session, url, "alice", "zebra")

            async def owner_published() -> bool:
                return (await _catalog(session, owner_url, "alice"))["active"] >= 1

            await wait_until(owner_published, timeout_s=240, what="the owner to publish a version of alice's")
            published = (await _catalog(session, owner_url, "alice"))["active"]

            async def followed() -> bool:
                return (await ask(session, url, "alice"))[1] >= published

            await wait_until(followed, timeout_s=30, what="the follower to serve the owner's version")
            pair: list[tuple[str, int]] = []

            async def same_version() -> bool:  # the owner may publish again meanwhile: a pair on one version
                pair[:] = [await ask(session, url, "alice"), await ask(session, owner_url, "alice")]
                return pair[0][1] == pair[1][1]

            await wait_until(same_version, timeout_s=30, what="both servers to serve one version of alice's")
            assert pair[0] == pair[1]  # one version, one greedy answer, whichever server serves it
            assert (await _catalog(session, url, "alice"))["active"] >= published
            async with session.post(url + "/v1/adapters/0/activate", params={"user": "alice"}) as response:
                assert response.status == 409, await response.text()
                assert (await response.json())["error"]["code"] == "lineage_owned_elsewhere"
            assert (await ask(session, url, "alice"))[1] >= published  # the refusal changed nothing
            async with session.get(url + "/v1/stats") as response:
                top = {t["tenant"]: t for t in (await response.json())["train"]["tenants"]["top"]}
            assert top["alice"]["owned"] is False
    finally:
        await owner.cleanup()
    try:
        async with aiohttp.ClientSession() as session:
            newest = (await _catalog(session, url, "alice"))["active"]
            await teach(session, url, "alice", "lemur")  # a changed fact: only an owner can publish it

            async def taken_over() -> bool:
                return (await _catalog(session, url, "alice"))["active"] > newest

            await wait_until(taken_over, timeout_s=240, what="the follower to own alice and publish")
            async with session.post(url + "/v1/adapters/0/activate", params={"user": "alice"}) as response:
                assert response.status == 200, await response.text()
    finally:
        await follower.cleanup()


def _untrained(journal_path: Path, user: str) -> int:
    with sqlite3.connect(journal_path) as journal:
        row = journal.execute("SELECT COUNT(*) FROM samples WHERE tenant = ? AND num_trained = 0 AND held_out = 0",
                              (user,)).fetchone()
    return int(row[0])


def _active(port: int, user: str) -> int:
    return int(_get(port, f"/v1/adapters?user={user}")["active"])


def _served_version(port: int, user: str) -> int:
    _, reply = _post(port, "/v1/chat/completions", {"model": "builtin:tiny", "messages": QUESTION,
                                                    "max_tokens": 8, "temperature": 0, "user": user})
    return int(reply["system_fingerprint"].rsplit("v", 1)[1])


def test_kill_9_of_the_owner_hands_its_tenant_to_the_other_server_with_every_acknowledged_sample(
    tmp_path: Path,
) -> None:
    first_port, second_port = free_port(), free_port()
    first = _serve(tmp_path, first_port, "mace", "first.log")
    second = None
    try:
        wait_ready(first_port, first)
        _served_version(first_port, "alice")  # the first server owns alice
        second = _serve(tmp_path, second_port, "mace", "second.log")
        wait_ready(second_port, second)
        _served_version(second_port, "alice")  # the second follows her
        samples = [{"user": "alice", "messages": [*QUESTION, {"role": "assistant", "content": "zebra"}]}] * 8
        assert _post(first_port, "/v1/feedback", samples)[0] == 202
        deadline = time.monotonic() + 240
        while _active(first_port, "alice") < 1:
            assert time.monotonic() < deadline, "the first server to publish a version of alice's"
            time.sleep(0.5)
        published = _active(first_port, "alice")
        more = [{"user": "alice", "messages": [{"role": "user", "content": f"Say {n}"},
                                               {"role": "assistant", "content": f"alice {n}"}]} for n in range(8)]
        status, accepted = _post(first_port, "/v1/feedback", more)
        assert status == 202 and len(accepted["ids"]) == 8
    finally:
        first.send_signal(signal.SIGKILL)  # acknowledged, and (most likely) not trained yet
        first.wait(timeout=30)
    assert second is not None
    try:
        killed_at = time.monotonic()
        while _served_version(second_port, "alice") < published:
            assert time.monotonic() - killed_at < 30, "the second server to serve alice's taught version"
            time.sleep(0.5)
        journal = tmp_path / "data" / "journal.sqlite3"
        with sqlite3.connect(journal) as db:
            kept = db.execute("SELECT COUNT(*) FROM samples WHERE tenant = 'alice'").fetchone()[0]
        assert kept == 16  # every acknowledged sample is in the journal
        deadline = time.monotonic() + 240
        while _untrained(journal, "alice"):  # and the server that took her over trains them
            assert time.monotonic() < deadline, "the second server to train alice's untrained samples"
            assert second.poll() is None
            time.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
