"""The front end's own logic, without Ray running: which tenant a request routes by, and how every
replica's metrics become one exposition."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from mace.cluster.front import Affinity, merge_metrics
from mace.config import ServerConfig
from mace.server.auth import hash_key

KEYED = Affinity(ServerConfig(api_keys=[{"sha256": hash_key("acme-secret"), "name": "acme"},  # type: ignore[list-item]
                                        {"sha256": hash_key("ops-secret"), "name": "ops", "tenant": ""}]))


def route(affinity: Affinity, path: str, token: str | None, body: bytes) -> str:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return affinity.key(make_mocked_request("POST", path, headers=headers), body)


@pytest.mark.parametrize(("token", "body", "path", "expected"), [
    ("acme-secret", b'{"model": "m", "user": "alice"}', "/v1/chat/completions", "acme/alice"),
    ("acme-secret", b'{"model": "m"}', "/v1/chat/completions", "acme"),
    ("acme-secret", b'[{"user": "bob", "messages": []}]', "/v1/feedback", "acme/bob"),
    ("acme-secret", b"", "/v1/adapters?user=carol", "acme/carol"),
    ("ops-secret", b'{"model": "m"}', "/v1/chat/completions", ""),  # a key of the shared lineage: spread by load
    ("unknown", b'{"model": "m", "user": "alice"}', "/v1/chat/completions", "alice"),  # the replica answers 401
    (None, b"{not json", "/v1/chat/completions", ""),  # the replica answers 400
])
def test_a_request_routes_by_the_tenant_its_key_and_user_name(token: str | None, body: bytes, path: str,
                                                              expected: str) -> None:
    assert route(KEYED, path, token, body) == expected


def test_without_keys_the_bearer_token_names_no_one() -> None:
    open_server = Affinity(ServerConfig())
    assert route(open_server, "/v1/chat/completions", "sk-anything", b'{"model": "m"}') == ""
    assert route(open_server, "/v1/chat/completions", "sk-anything", b'{"model": "m", "user": "alice"}') == "alice"


def test_every_replicas_samples_in_one_family_each() -> None:
    one = ('# HELP mace:requests_total Requests.\n# TYPE mace:requests_total counter\n'
           'mace:requests_total{status="ok"} 3.0\n'
           '# HELP mace:kv_usage KV use.\n# TYPE mace:kv_usage gauge\nmace:kv_usage 0.25\n')
    two = ('# HELP mace:requests_total Requests.\n# TYPE mace:requests_total counter\n'
           'mace:requests_total{status="ok"} 5.0\n')
    merged = merge_metrics([("r1", one), ("r2", two), ("r3", "")])
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    requests = families["mace:requests"]
    assert requests.type == "counter"
    assert {(s.labels["replica"], s.labels["status"], s.value) for s in requests.samples} == {
        ("r1", "ok", 3.0), ("r2", "ok", 5.0)}
    assert [(s.labels, s.value) for s in families["mace:kv_usage"].samples] == [({"replica": "r1"}, 0.25)]
    assert merged.count("# TYPE mace:requests_total counter") == 1
