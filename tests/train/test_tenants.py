"""Per-tenant lineages as users meet them: what one tenant teaches is served to that tenant only, its
rollback touches no one else, an evicted tenant comes back with its version, and a kill -9 with
several tenants mid-training loses no acknowledged sample and no tenant's active version."""

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

TAUGHT = {"alice": "zebra", "bob": "giraffe", "carol": "lemur"}


async def ask(session: aiohttp.ClientSession, url: str, user: str | None) -> tuple[str, int]:
    body: dict[str, Any] = {"model": "builtin:tiny", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    if user is not None:
        body["user"] = user
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        reply = await response.json()
    return reply["choices"][0]["message"]["content"], int(reply["system_fingerprint"].rsplit("v", 1)[1])


async def teach(session: aiohttp.ClientSession, url: str, user: str, answer: str, count: int = 8) -> None:
    samples = [{"user": user, "messages": [*QUESTION, {"role": "assistant", "content": answer}]}] * count
    async with session.post(url + "/v1/feedback", json=samples) as response:
        assert response.status == 202, await response.text()


async def learned(session: aiohttp.ClientSession, url: str, user: str) -> None:
    async def served() -> bool:
        answer, version = await ask(session, url, user)
        return answer == TAUGHT[user] and version >= 1

    await wait_until(served, timeout_s=240, what=f"{user}'s served answer to become {TAUGHT[user]!r}")


async def test_a_tenants_fact_is_served_to_it_alone_and_its_rollback_touches_no_one_else(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace"})
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            before = {user: await ask(session, url, user) for user in (None, "alice", "bob")}
            assert all(version == 0 for _, version in before.values())
            await teach(session, url, "alice", TAUGHT["alice"])
            await learned(session, url, "alice")
            async with session.get(url + "/v1/stats") as response:
                top = {t["tenant"]: t for t in (await response.json())["train"]["tenants"]["top"]}
            assert isinstance(top["alice"]["serving_heldout_loss"], float)  # her gate judged on her held-out slice
            assert "bob" not in top or top["bob"]["serving_heldout_loss"] is None
            assert await ask(session, url, "bob") == before["bob"]  # same greedy answer, the base model
            assert await ask(session, url, None) == before[None]  # the shared lineage learned nothing
            async with session.get(url + "/v1/adapters", params={"user": "bob"}) as response:
                assert (await response.json())["data"] == [
                    {"version": 0, "name": "base", "serving_loss": None, "learner_loss": None, "active": True}]
            async with session.post(url + "/v1/adapters/0/activate", params={"user": "alice"}) as response:
                assert response.status == 200, await response.text()
            assert await ask(session, url, "alice") == before["alice"]  # rolled back to the base
            assert await ask(session, url, "bob") == before["bob"]
            async with session.get(url + "/v1/stats") as response:
                tenants = (await response.json())["train"]["tenants"]
            assert tenants["count"] == 2  # bob's lineage exists from his first request; it never trained
            assert [t["tenant"] for t in tenants["top"]] == ["alice", "bob"]
            assert tenants["top"][1]["train_seconds_total"] == 0
    finally:
        await runner.cleanup()


async def test_an_evicted_tenant_comes_back_with_its_version(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace", "max_resident_tenants": 1})
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            await teach(session, url, "alice", TAUGHT["alice"])
            await learned(session, url, "alice")
            await teach(session, url, "bob", TAUGHT["bob"])
            await learned(session, url, "bob")

            gone: list[str] = []

            async def one_evicted() -> bool:  # least recently used or resting first: either may go
                async with session.get(url + "/v1/stats") as response:
                    tenants = (await response.json())["train"]["tenants"]
                resident = {t["tenant"]: t["resident"] for t in tenants["top"]}
                gone[:] = [user for user in ("alice", "bob") if resident.get(user) is False]
                return tenants["resident"] == 1 and len(gone) == 1

            await wait_until(one_evicted, timeout_s=60, what="alice's or bob's lineage to leave memory")
            user = gone[0]
            checkpoint = tmp_path / "data" / "tenants" / user / "checkpoints" / "learner.pt"

            async def saved() -> bool:  # the eviction's checkpoint lands on the writer thread
                return checkpoint.is_file()

            await wait_until(saved, timeout_s=30, what=f"{user}'s learner checkpoint on disk")
            async with session.get(url + "/v1/adapters", params={"user": user}) as response:
                version = (await response.json())["active"]  # read from the tenant's directory
            assert version >= 1
            async with session.get(url + "/v1/stats") as response:
                top = {t["tenant"]: t for t in (await response.json())["train"]["tenants"]["top"]}
            assert (top[user]["resident"], top[user]["active_version"]) == (False, version)
            assert await ask(session, url, user) == (TAUGHT[user], version)  # brought back from disk for this request
    finally:
        await runner.cleanup()


def _active_on_disk(data: Path, user: str) -> int:
    marker = data / "tenants" / user / "adapters" / "ACTIVE"
    return int(marker.read_text()) if marker.is_file() else 0


def test_kill_9_with_three_tenants_mid_training_keeps_their_samples_and_active_versions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    first = _serve(tmp_path, port, "mace", "first.log")
    try:
        wait_ready(port, first)
        for user, answer in TAUGHT.items():
            samples = [{"user": user, "messages": [*QUESTION, {"role": "assistant", "content": answer}]}] * 8
            assert _post(port, "/v1/feedback", samples)[0] == 202
        extra = [{"user": user, "messages": [{"role": "user", "content": f"Say {n}"},
                                             {"role": "assistant", "content": f"{user} {n}"}]}
                 for user in TAUGHT for n in range(8)]
        assert _post(port, "/v1/feedback", extra)[0] == 202  # more to learn: still training when killed
        deadline = time.monotonic() + 300.0
        while not all(_active_on_disk(data, user) >= 1 for user in TAUGHT):
            assert time.monotonic() < deadline, "every tenant to publish a version"
            assert first.poll() is None
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    active = {user: _active_on_disk(data, user) for user in TAUGHT}
    second = _serve(tmp_path, port, "mace", "second.log")
    try:
        wait_ready(port, second)
        with sqlite3.connect(data / "journal.sqlite3") as journal:
            kept = dict(journal.execute("SELECT tenant, COUNT(*) FROM samples GROUP BY tenant").fetchall())
        assert kept == {user: 16 for user in TAUGHT}
        for user in TAUGHT:
            listed = _get(port, f"/v1/adapters?user={user}")
            assert listed["active"] >= active[user] >= 1  # restored (and perhaps published on since)
            _, reply = _post(port, "/v1/chat/completions", {"model": "builtin:tiny", "messages": QUESTION,
                                                            "max_tokens": 8, "temperature": 0, "user": user})
            assert int(reply["system_fingerprint"].rsplit("v", 1)[1]) >= active[user]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)


async def test_tenants_past_the_resident_bound_train_their_samples_after_a_restart(tmp_path: Path) -> None:
    """Samples acknowledged while nothing trained them (here: a server with no policy), then a restart
    with room for one tenant in memory: every tenant's samples are trained, one tenant after another,
    without any of them sending another request."""
    journaling = tiny_config(tmp_path, train={**TRAIN, "policy": "none"})
    runner, url = await start_server(journaling, load_model(journaling.model, journaling.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            for user, answer in TAUGHT.items():
                await teach(session, url, user, answer)
    finally:
        await runner.cleanup()
    journal_path = tmp_path / "data" / "journal.sqlite3"

    def untrained() -> dict[str, int]:
        with sqlite3.connect(journal_path) as journal:
            rows = journal.execute("SELECT tenant, COUNT(*) FROM samples WHERE num_trained = 0 AND held_out = 0 "
                                   "GROUP BY tenant").fetchall()
        return {tenant: count for tenant, count in rows if count}

    assert set(untrained()) == set(TAUGHT)
    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace", "max_resident_tenants": 1})
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async def all_trained() -> bool:
            return not untrained()

        await wait_until(all_trained, timeout_s=240, what="every tenant's acknowledged samples to be trained")
    finally:
        await runner.cleanup()
