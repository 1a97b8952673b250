"""API keys and scopes: who may call what, in OpenAI's error shape, over HTTP and the websocket upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mace.config import ConfigError, ServerConfig, load_config
from mace.model.loader import ModelBundle
from mace.server.auth import check_bind, hash_key
from tests.conftest import RunningServer, start_server, tiny_config
from tests.test_cli import mace

READER, TRAINER, ADMIN, FEEDER = "sk-reader-0001", "sk-trainer-0002", "sk-admin-0003", "sk-feeder-0004"
CHAT = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SAMPLE = {"prompt": "colour?", "completion": "blue"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def keyed(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    keys = [
        {"sha256": hash_key(READER), "name": "reader", "scopes": ["infer"]},
        {"sha256": hash_key(TRAINER), "name": "trainer", "scopes": ["infer", "train"]},
        {"sha256": hash_key(ADMIN), "name": "admin", "scopes": ["admin"]},
        {"sha256": hash_key(FEEDER), "name": "feeder", "scopes": ["train"]},
    ]
    config = tiny_config(tmp_path_factory.mktemp("auth"), server={"api_keys": keys})
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


async def assert_error(response: aiohttp.ClientResponse, status: int, error_type: str, code: str) -> None:
    assert response.status == status
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == (error_type, code)
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/openapi.json"])
async def test_operational_routes_stay_open(keyed: RunningServer, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(keyed.url + path) as response:
        assert response.status == 200


async def test_missing_and_wrong_keys_are_401(keyed: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{keyed.url}/v1/chat/completions", json=CHAT) as response:
        await assert_error(response, 401, "authentication_error", "missing_api_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{keyed.url}/v1/models", headers=bearer("sk-not-a-key-999")) as response:
        await assert_error(response, 401, "authentication_error", "invalid_api_key")
    async with http.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Basic {READER}"}) as response:
        await assert_error(response, 401, "authentication_error", "missing_api_key")
    async with http.get(f"{keyed.url}/v1/models?api_key={READER}") as response:  # the query is for websockets only
        await assert_error(response, 401, "authentication_error", "missing_api_key")


async def test_scopes_decide_each_route(keyed: RunningServer, http: aiohttp.ClientSession) -> None:
    url = keyed.url
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(READER)) as response:
        assert response.status == 200
    async with http.post(f"{url}/v1/feedback", json=SAMPLE, headers=bearer(READER)) as response:
        await assert_error(response, 403, "permission_error", "insufficient_scope")
    async with http.post(f"{url}/v1/feedback", json=SAMPLE, headers=bearer(FEEDER)) as response:
        assert response.status == 202
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(FEEDER)) as response:
        await assert_error(response, 403, "permission_error", "insufficient_scope")
    async with http.post(f"{url}/v1/adapters/0/activate", headers=bearer(READER)) as response:
        await assert_error(response, 403, "permission_error", "insufficient_scope")
    async with http.post(f"{url}/v1/adapters/0/activate", headers=bearer(TRAINER)) as response:
        assert response.status == 200  # its own lineage (tests/server/test_tenants_api.py has the rest)
    async with http.post(f"{url}/v1/adapters/0/activate?tenant=", headers=bearer(TRAINER)) as response:
        await assert_error(response, 403, "permission_error", "insufficient_scope")  # the shared one is admin's
    async with http.get(f"{url}/v1/adapters", headers=bearer(READER)) as response:
        assert response.status == 200
    async with http.post(f"{url}/v1/adapters/0/activate?tenant=", headers=bearer(ADMIN)) as response:
        assert response.status == 200  # admin covers rollback and, like every admin, the other scopes
    async with http.get(f"{url}/v1/feedback", headers=bearer(ADMIN)) as response:
        assert response.status == 200 and (await response.json())["total"] >= 1


async def test_websocket_checks_the_key_at_upgrade(keyed: RunningServer, http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
        await http.ws_connect(f"{keyed.url}/v1/ws")
    assert missing.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as forbidden:
        await http.ws_connect(f"{keyed.url}/v1/ws", headers=bearer(FEEDER))
    assert forbidden.value.status == 403
    for options in ({"headers": bearer(READER)}, {"params": {"api_key": READER}}):
        async with http.ws_connect(f"{keyed.url}/v1/ws", **options) as ws:  # type: ignore[arg-type]
            await ws.send_json({"type": "chat", "id": "a", "messages": CHAT["messages"], "max_tokens": 2})
            kinds = set()
            while "done" not in kinds:
                message = await ws.receive_json(timeout=30)
                assert message["type"] in ("delta", "done"), message
                kinds.add(message["type"])


def test_plain_keys_from_the_environment_are_hashed() -> None:
    config = load_config(None, environ={"MACE_SERVER__API_KEYS": "sk-first-secret,sk-second-secret:admin"})
    first, second = config.server.api_keys
    assert first.sha256 == hash_key("sk-first-secret") and first.scopes == ("infer", "train")
    assert second.scopes == ("admin",)
    assert "sk-first-secret" not in repr(config)
    with pytest.raises(ConfigError, match="api_keys"):
        load_config(None, environ={"MACE_SERVER__API_KEYS": "sk-good-secret:root"})
    with pytest.raises(ConfigError, match="api_keys"):
        load_config(None, overrides={"server": {"api_keys": [{"sha256": "not-hex"}]}}, environ={})


def test_binding_beyond_loopback_needs_keys_or_force() -> None:
    assert check_bind(ServerConfig(host="127.0.0.1")) is None
    assert check_bind(ServerConfig(host="::1")) is None
    refusal = check_bind(ServerConfig(host="0.0.0.0"))
    assert refusal is not None and "MACE_SERVER__API_KEYS" in refusal
    assert check_bind(ServerConfig(host="0.0.0.0", allow_unauthenticated=True)) is None
    assert check_bind(ServerConfig.model_validate({"host": "0.0.0.0", "api_keys": "sk-some-secret"})) is None


def test_cli_refuses_an_open_public_bind(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "MACE_CACHE_DIR": str(tmp_path), "MACE_DATA_DIR": str(tmp_path / "data")}
    log = tmp_path / "serve.log"
    process = mace("serve", "--config", "configs/tiny.toml", "--host", "0.0.0.0", env=env, log=log)
    assert process.wait(timeout=60) == 2
    output = log.read_text()
    assert "refusing to serve '0.0.0.0' without API keys" in output and "--allow-unauthenticated" in output
