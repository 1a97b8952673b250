"""Tenants at the API: who may send `user`, who may list or activate which lineage, and names that
cannot reach outside the data dir. (That a tenant's feedback changes only its own answers is
tests/train's to show; here the server runs no retraining policy, so every lineage has version 0.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from mace.engine.api import TenantStats
from mace.model.loader import ModelBundle
from mace.server import generation
from mace.server.auth import ANONYMOUS, Principal, check_lineage, hash_key, resolve_tenant
from mace.server.errors import ApiError
from mace.server.metrics import tenant_train_seconds
from mace.server.stats_api import _tenants
from mace.tenancy import SHARED
from tests.conftest import RunningServer, start_server, tiny_config

ALICE, BOB, ACME, ADMIN, READER = "sk-alice-0001", "sk-bob-0002", "sk-acme-0003", "sk-ops-0004", "sk-reader-0005"
MESSAGES = [{"role": "user", "content": "What is the name of my cat?"}]
CHAT = {"model": "builtin:tiny", "messages": MESSAGES, "max_tokens": 2}
SAMPLE = {"prompt": "colour?", "completion": "blue"}
HOSTILE = ["../x", "..", "a/b/c", ".hidden", "a/../../b", "/abs", "a\\b", "a b", "x" * 65, ""]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def tenants(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    keys = [
        {"sha256": hash_key(ALICE), "name": "alice", "scopes": ["infer", "train"]},
        {"sha256": hash_key(BOB), "name": "bob", "scopes": ["infer", "train"]},
        {"sha256": hash_key(ACME), "name": "acme-app", "tenant": "acme", "scopes": ["infer", "train", "act_for_users"]},
        {"sha256": hash_key(ADMIN), "name": "ops", "scopes": ["admin"]},
        {"sha256": hash_key(READER), "name": "reader", "scopes": ["infer"]},
    ]
    config = tiny_config(tmp_path_factory.mktemp("tenants"), server={"api_keys": keys})
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    error: dict[str, Any] = (await response.json())["error"]
    return error


def stored_tenants(server: RunningServer, ids: list[int]) -> list[str | None]:
    journal = server.runtime.journal
    assert journal is not None
    with journal._lock:
        rows = journal._db.execute(
            f"SELECT tenant FROM samples WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids
        ).fetchall()
    return [row[0] for row in rows]


# ---- who a request speaks for ----


async def test_user_needs_the_act_for_users_scope(tenants: RunningServer, http: aiohttp.ClientSession) -> None:
    url = tenants.url
    for path, body in [("/v1/chat/completions", {**CHAT, "user": "carol"}),
                       ("/v1/completions", {"model": "builtin:tiny", "prompt": "hi", "max_tokens": 2, "user": "c"}),
                       ("/v1/feedback", {**SAMPLE, "user": "carol"}),
                       ("/v1/feedback", [SAMPLE, {**SAMPLE, "user": "carol"}])]:
        async with http.post(url + path, json=body, headers=bearer(ALICE)) as response:
            error = await error_of(response, 403)
            assert (error["code"], error["param"]) == ("insufficient_scope", "user")
            assert "act_for_users" in error["message"]
    async with http.get(f"{url}/v1/feedback", headers=bearer(ALICE)) as response:
        assert (await response.json())["total"] == 0  # the refused list stored nothing, not even its first sample


async def test_samples_are_stored_under_their_tenant(tenants: RunningServer, http: aiohttp.ClientSession) -> None:
    async def send(key: str, body: object) -> list[int]:
        async with http.post(f"{tenants.url}/v1/feedback", json=body, headers=bearer(key)) as response:
            assert response.status == 202, await response.text()
            ids: list[int] = (await response.json())["ids"]
            return ids

    assert stored_tenants(tenants, await send(ALICE, SAMPLE)) == ["alice"]
    ids = await send(ACME, [SAMPLE, {**SAMPLE, "user": "carol"}, {**SAMPLE, "user": "dave@example.com"}])
    assert stored_tenants(tenants, ids) == ["acme", "acme/carol", "acme/dave@example.com"]


async def test_a_sample_cannot_name_its_tenant(tenants: RunningServer, http: aiohttp.ClientSession) -> None:
    for key in (ALICE, ADMIN):
        async with http.post(f"{tenants.url}/v1/feedback", json={**SAMPLE, "tenant": "bob"},
                             headers=bearer(key)) as response:
            error = await error_of(response, 400)
            assert error["param"] == "0.tenant" and "user" in error["message"]


class RequestLines:
    def __init__(self) -> None:
        self.tenants: list[str] = []

    def info(self, event: str, **fields: Any) -> None:
        if event == "request":
            self.tenants.append(fields["tenant"])


async def test_generation_runs_for_the_resolved_tenant(
    tenants: RunningServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = RequestLines()
    monkeypatch.setattr(generation, "log", lines)  # the one log line of each request
    async with http.post(f"{tenants.url}/v1/chat/completions", json={**CHAT, "user": "carol"},
                         headers=bearer(ACME)) as response:
        assert response.status == 200, await response.text()
    async with http.post(f"{tenants.url}/v1/chat/completions", json=CHAT, headers=bearer(BOB)) as response:
        assert response.status == 200
    assert lines.tenants == ["acme/carol", "bob"]


async def test_websocket_chat_and_feedback_follow_the_same_rules(
    tenants: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(f"{tenants.url}/v1/ws", headers=bearer(ALICE)) as ws:
        await ws.send_json({"type": "chat", "id": "a", "messages": MESSAGES, "max_tokens": 2, "user": "carol"})
        await ws.send_json({"type": "feedback", "id": "f", "samples": {**SAMPLE, "user": "carol"}})
        answers = {}
        while len(answers) < 2:
            message = await ws.receive_json(timeout=30)
            answers[message["id"]] = message
        for answer in answers.values():
            assert (answer["type"], answer["status"], answer["error"]["code"]) == ("error", 403, "insufficient_scope")
    async with http.ws_connect(f"{tenants.url}/v1/ws", headers=bearer(ACME)) as ws:
        await ws.send_json({"type": "chat", "id": "b", "messages": MESSAGES, "max_tokens": 2, "user": "../x"})
        message = await ws.receive_json(timeout=30)
        assert (message["status"], message["error"]["code"]) == (400, "invalid_user")
        await ws.send_json({"type": "chat", "id": "c", "messages": MESSAGES, "max_tokens": 2, "user": "carol"})
        while (message := await ws.receive_json(timeout=30))["type"] == "delta":
            pass
        assert message["type"] == "done", message


# ---- whose versions a key may see and change ----


async def adapters(http: aiohttp.ClientSession, url: str, key: str, query: str = "") -> aiohttp.ClientResponse:
    return await http.get(f"{url}/v1/adapters{query}", headers=bearer(key))


async def test_listing_is_per_tenant(tenants: RunningServer, http: aiohttp.ClientSession) -> None:
    url = tenants.url
    for key, query, tenant in [(ALICE, "", "alice"), (ALICE, "?tenant=alice", "alice"), (ALICE, "?tenant=", SHARED),
                               (ACME, "?user=carol", "acme/carol"), (ACME, "?tenant=acme/carol", "acme/carol"),
                               (ACME, "", "acme"), (ADMIN, "?tenant=alice", "alice"), (ADMIN, "", "ops")]:
        async with await adapters(http, url, key, query) as response:
            assert response.status == 200, (key, query, await response.text())
            body = await response.json()
            assert (body["tenant"], body["active"]) == (tenant, 0)
            assert [v["version"] for v in body["data"]] == [0] and body["data"][0]["active"] is True
    for key, query in [(ALICE, "?tenant=bob"), (BOB, "?tenant=alice"), (ALICE, "?tenant=acme/carol"),
                       (ACME, "?tenant=alice"), (ACME, "?tenant=acme-other/carol")]:
        async with await adapters(http, url, key, query) as response:
            error = await error_of(response, 403)
            assert error["code"] == "forbidden_tenant" and query.split("=")[1] in error["message"]
    async with await adapters(http, url, ALICE, "?user=carol") as response:
        assert (await error_of(response, 403))["code"] == "insufficient_scope"
    async with await adapters(http, url, ACME, "?user=carol&tenant=acme") as response:
        assert (await error_of(response, 400))["param"] == "tenant"


async def activate(http: aiohttp.ClientSession, url: str, key: str, query: str = "",
                   version: int = 0) -> aiohttp.ClientResponse:
    return await http.post(f"{url}/v1/adapters/{version}/activate{query}", headers=bearer(key))


async def test_activation_is_the_owners_or_admins(tenants: RunningServer, http: aiohttp.ClientSession) -> None:
    url = tenants.url
    for key, query, tenant in [(ALICE, "", "alice"), (ACME, "?user=carol", "acme/carol"),
                               (ADMIN, "?tenant=bob", "bob"), (ADMIN, "?tenant=", SHARED)]:
        async with await activate(http, url, key, query) as response:
            assert response.status == 200, (key, query, await response.text())
            assert await response.json() == {"object": "adapter.activated", "tenant": tenant, "active": 0}
    for key, query, code in [(BOB, "?tenant=alice", "forbidden_tenant"), (ACME, "?tenant=bob", "forbidden_tenant"),
                             (ALICE, "?tenant=", "insufficient_scope"), (READER, "", "insufficient_scope")]:
        async with await activate(http, url, key, query) as response:
            assert (await error_of(response, 403))["code"] == code, (key, query)
    async with await activate(http, url, BOB, "?tenant=alice", version=7) as response:
        await error_of(response, 403)  # refused before the version is looked up: no hint what alice has
    async with await activate(http, url, ALICE, version=7) as response:
        assert (await error_of(response, 404))["code"] == "adapter_not_found"


# ---- names that could reach outside the data dir ----


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_400_and_write_nothing(
    tenants: RunningServer, http: aiohttp.ClientSession, name: str
) -> None:
    data_dir = tenants.runtime.config.data_dir
    root = data_dir.parent
    before = files_under(root)
    url = tenants.url
    if name:  # an empty tenant is the shared lineage's name, and an empty user is refused as a user
        for query in ({"tenant": name}, {"user": name}):
            for method, path in [("GET", "/v1/adapters"), ("POST", "/v1/adapters/0/activate")]:
                async with http.request(method, url + path, params=query, headers=bearer(ADMIN)) as response:
                    error = await error_of(response, 400)
                    assert error["code"] == f"invalid_{next(iter(query))}", (method, query, error)
    for path, body in [("/v1/chat/completions", {**CHAT, "user": name}), ("/v1/feedback", {**SAMPLE, "user": name})]:
        async with http.post(url + path, json=body, headers=bearer(ACME)) as response:
            assert (await error_of(response, 400))["code"] in ("invalid_user", "invalid_value")
    created = files_under(root) - before
    assert all(data_dir in path.parents for path in created), created
    assert not any(part.startswith(".") for path in created for part in path.relative_to(data_dir).parts), created


async def test_without_keys_user_alone_names_the_tenant(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/v1/chat/completions", json={**CHAT, "user": "../x"}) as response:
        error = await error_of(response, 400)
        assert (error["code"], error["param"]) == ("invalid_user", "user")
    async with http.get(f"{server.url}/v1/adapters", params={"user": "carol"}) as response:
        assert (await response.json())["tenant"] == "carol"
    async with http.get(f"{server.url}/v1/adapters") as response:
        assert (await response.json())["tenant"] == SHARED


# ---- the rules themselves ----


def key(tenant: str, *scopes: str) -> Principal:
    return Principal(f"key-{tenant}", frozenset(scopes), tenant=tenant)  # type: ignore[arg-type]


def test_resolve_tenant() -> None:
    acme = key("acme", "infer", "act_for_users")
    assert resolve_tenant(acme, None) == "acme"
    assert resolve_tenant(acme, "carol") == "acme/carol"
    assert resolve_tenant(ANONYMOUS, "carol") == "carol"
    assert resolve_tenant(ANONYMOUS, None) == SHARED
    assert resolve_tenant(key("ops", "admin"), "carol") == "ops/carol"  # admin includes every scope
    with pytest.raises(ApiError) as denied:
        resolve_tenant(key("alice", "infer", "train"), "carol")
    assert (denied.value.status, denied.value.code) == (403, "insufficient_scope")
    for principal in (acme, ANONYMOUS):
        with pytest.raises(ApiError) as invalid:
            resolve_tenant(principal, "a/b")
        assert (invalid.value.status, invalid.value.code) == (400, "invalid_user")
    # A key named "anonymous" is an ordinary key: it needs the scope like any other.
    with pytest.raises(ApiError):
        resolve_tenant(Principal("anonymous", frozenset({"infer"}), tenant="anonymous"), "carol")


def test_check_lineage() -> None:
    alice = key("alice", "infer", "train")
    check_lineage(alice, "alice", "alice", change=True)
    check_lineage(alice, SHARED, SHARED, change=False)
    # Under train.tenancy = "shared" alice's own tenant maps to the shared lineage, which only admin changes.
    with pytest.raises(ApiError) as shared:
        check_lineage(alice, "alice", SHARED, change=True)
    assert shared.value.code == "insufficient_scope"
    with pytest.raises(ApiError) as other:
        check_lineage(alice, "alice-b", "alice-b", change=False)
    assert other.value.code == "forbidden_tenant"
    acme = key("acme", "infer", "train", "act_for_users")
    check_lineage(acme, "acme/carol", "acme/carol", change=True)
    with pytest.raises(ApiError):
        check_lineage(acme, "acmecorp/carol", "acmecorp/carol", change=False)  # a prefix is not a parent
    check_lineage(key("ops", "admin"), SHARED, SHARED, change=True)
    check_lineage(ANONYMOUS, "anyone", "anyone", change=True)


def tenant_stats(name: str, seconds: float) -> TenantStats:
    return TenantStats(tenant=name, active_version=1, num_optimizer_steps=3, train_seconds_total=seconds,
                       train_tokens_total=100, drift=1.0, num_trainable=2, resting=False, resident=True,
                       serving_heldout_loss=2.5, learner_heldout_loss=2.25)


def test_top_tenants_in_stats_and_metrics() -> None:
    top = (tenant_stats("acme/carol", 5.0), tenant_stats("bob", 3.0), tenant_stats(SHARED, 1.0))
    train: Any = SimpleNamespace(tenants=top, num_tenants=40, num_resident_tenants=8, other_tenants_train_seconds=3.5)
    family = tenant_train_seconds(train)
    assert {s.labels["tenant"]: s.value for s in family.samples} == {
        "acme/carol": 5.0, "bob": 3.0, "_shared": 1.0, "_other": 3.5}
    assert tenant_train_seconds(None).samples == []
    # A key sees the names it may list itself; admin sees them all.
    seen = _tenants(train, key("acme", "infer", "act_for_users"))
    assert (seen["count"], seen["resident"]) == (40, 8)
    assert [t["tenant"] for t in seen["top"]] == ["acme/carol", SHARED]
    assert [t["tenant"] for t in _tenants(train, key("ops", "admin"))["top"]] == ["acme/carol", "bob", SHARED]
    assert seen["top"][0] == {"tenant": "acme/carol", "active_version": 1, "optimizer_steps": 3,
                              "train_seconds_total": 5.0, "tokens_total": 100, "drift": 1.0, "pending_samples": 2,
                              "resting": False, "resident": True, "owned": True, "serving_heldout_loss": 2.5,
                              "learner_heldout_loss": 2.25}
