"""The multi-tenant trace: determinism, distinct facts per tenant, leak detection on crafted answers,
and a run (and `compare`) against a fake server that learns per `user`, or for everyone."""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from loadgen.compare import ServerSpec, add_taught, compare, final_alignment
from loadgen.metrics import RequestRecord, contains, leaked, summarize, tenant_alignment
from loadgen.report import comparison_table
from loadgen.runner import RunConfig, Runner
from loadgen.tenants import (
    ATTRIBUTES,
    CHAT_MAX_TOKENS,
    QUESTIONS,
    SYSTEM,
    facts,
    max_tenants,
    question,
    question_key,
    taught_by_all,
    tenant_names,
)
from loadgen.traces import DriftSpec, TraceItem, builtin, dumps, read, write

from tests.conftest import serve_app
from tests.loadgen.fake_server import SEEN, fake_app

ROOT = Path(__file__).resolve().parents[2]
SPEC = DriftSpec(seed=5, phases=3, phase_s=60.0, rate=3.0)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    first = dumps(builtin("tenants", SPEC))
    assert first == dumps(builtin("tenants", SPEC))
    assert first != dumps(builtin("tenants", DriftSpec(seed=6, phases=3, phase_s=60.0, rate=3.0)))


def test_every_tenant_has_its_own_facts_and_changes_one_at_each_boundary() -> None:
    history = facts(random.Random(0), tenants=16, phases=4)
    assert sorted(history[0]) == tenant_names(16) == [f"tenant-{i:02d}" for i in range(16)]
    for attribute in ATTRIBUTES:
        for phase in history:  # within a phase, 16 different answers to the same question
            assert len({values[attribute] for values in phase.values()}) == 16
        owners: dict[str, set[str]] = {}  # and no value is ever held by two tenants
        for phase in history:
            for tenant, values in phase.items():
                owners.setdefault(values[attribute], set()).add(tenant)
        assert all(len(tenants) == 1 for tenants in owners.values())
    for before, after in itertools.pairwise(history):
        changed = {tenant: [a for a in ATTRIBUTES if before[tenant][a] != after[tenant][a]] for tenant in before}
        assert all(len(attributes) == 1 for attributes in changed.values())
        per_attribute = [sum(attrs == [a] for attrs in changed.values()) for a in ATTRIBUTES]
        assert per_attribute == [4, 4, 4, 4]  # spread evenly


def test_tenant_and_chat_items() -> None:
    items = builtin("tenants", SPEC)
    assert 400 < len(items) < 700  # ~3 req/s for 180 s
    asked = [item for item in items if item.tenant is not None]
    chat = [item for item in items if item.tenant is None]
    assert 0.25 < len(chat) / len(items) < 0.42  # 8 chatters among 24 users: a third
    for item in chat:
        assert item.reference is None and item.feedback is None and item.other_answers is None
        assert item.user is not None and item.user.startswith("chat-") and item.max_tokens == CHAT_MAX_TOKENS
    questions = {attribute: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
                 for attribute, text in QUESTIONS.items()}
    answers: dict[tuple[int, str, str], str] = {}
    for item in asked:
        assert item.user == item.tenant and item.tenant is not None and item.reference is not None
        assert item.messages in questions.values()  # word for word the same for every tenant
        assert item.tenant not in str(item.messages)
        key = (item.phase, item.tenant, item.messages[-1]["content"])
        assert answers.setdefault(key, item.reference) == item.reference
        assert item.other_answers is not None and item.reference not in item.other_answers
        if item.feedback:
            [sample] = item.feedback
            assert sample["user"] == item.tenant
            assert sample["messages"] == [*item.messages, {"role": "assistant", "content": item.reference}]
    # Other answers: exactly what the other tenants taught (in feedback) to that question before it came.
    for position, item in enumerate(asked):
        taught = {earlier.reference for earlier in asked[:position]
                  if earlier.feedback and earlier.tenant != item.tenant and earlier.messages == item.messages}
        assert set(item.other_answers or []) == taught
    assert sum(bool(item.other_answers) for item in asked) > len(asked) / 2  # most questions can leak
    # The deck: every (tenant, question) pair is asked in every phase (~120 tenant requests a phase here).
    for phase in range(SPEC.phases):
        pairs = {(i.tenant, i.messages[-1]["content"]) for i in asked if i.phase == phase}
        assert len(pairs) == 16 * len(ATTRIBUTES)
    with_feedback = [item for item in asked if item.feedback]
    assert 0.35 < len(with_feedback) / len(asked) < 0.65


def test_sizes_and_limits() -> None:
    items = builtin("tenants", DriftSpec(seed=1, phases=1, tenants=3, chatters=0))
    assert {item.tenant for item in items} == {"tenant-00", "tenant-01", "tenant-02"}
    assert max_tenants(1) == 40 and max_tenants(3) == 26
    with pytest.raises(ValueError, match="at most 26 tenants"):
        builtin("tenants", DriftSpec(tenants=27))
    with pytest.raises(ValueError, match="at least one tenant"):
        builtin("tenants", DriftSpec(tenants=0))


def test_jsonl_keeps_tenants_and_single_tenant_lines_do_not_change(tmp_path: Path) -> None:
    items = builtin("tenants", SPEC)[:30]
    path = tmp_path / "tenants.jsonl"
    write(path, items)
    assert read(path) == items
    assert b'"tenant":"tenant-' in path.read_bytes() and b'"other_answers":[' in path.read_bytes()
    assert b"tenant" not in dumps(builtin("personalization", SPEC)[:30])


def record(answer: str | None, reference: str = "Zorblax", tenant: str | None = "tenant-00",
           others: list[str] | None = None, **fields: object) -> RequestRecord:
    base: dict[str, object] = {"request_id": "r", "kind": "chat", "answer": answer, "reference": reference,
                               "tenant": tenant,
                               "other_answers": ["Mothball", "New Quay"] if others is None else others}
    return RequestRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_leaks_on_crafted_answers() -> None:
    assert contains("I think it is Mothball.", "mothball") and not contains("Mothballs", "Mothball")
    assert contains("new-quay", "New Quay") and not contains("Quay", "New Quay") and not contains(None, "x")
    assert leaked(record("Mothball")) == ["Mothball"]  # another tenant's cat
    assert leaked(record(" mothball! ")) == ["Mothball"]
    assert leaked(record("Mothball or New Quay")) == ["Mothball", "New Quay"]
    assert leaked(record("Zorblax")) == []  # its own
    assert leaked(record("Zorblax, not Mothball")) == []  # names its own too: not counted as a leak
    assert leaked(record("Biscuit")) == []  # wrong, but nobody's
    assert leaked(record("Mothball", status="http_500")) == []  # failed requests are not scored
    assert leaked(record("Mothball", tenant=None)) == []  # no tenant: nothing to leak across
    assert leaked(record("Mothball", others=[])) == []


def test_tenant_alignment_on_crafted_records() -> None:
    a, b, c = "tenant-00", "tenant-01", "tenant-02"
    records = [
        record("Zorblax", tenant=a, adapter_version=1), record("Zorblax", tenant=a, adapter_version=3),
        record("Zorblax", tenant=a), record("nope", tenant=a),  # a: 3 / 4
        record("Mothball", tenant=b, reference="Pipkin"),  # b: 1 / 2, 1 leak
        record("Pipkin", tenant=b, reference="Pipkin"),
        record("Zorblax", tenant=c, reference="Gizmo", others=["Zorblax"]),  # c: 0 / 1, 1 leak (a's cat)
        record("Gizmo", tenant=c, reference="Gizmo", status="timeout"),  # not scored
        record("Zorblax", tenant=None),  # no tenant: not scored per tenant
        record("Zorblax", tenant=a, kind="feedback"),  # not a generation
    ]
    events = [{"kind": "adapter", "time_s": 1.0, "version": 1, "tenant": a, "initial": True},
              {"kind": "adapter", "time_s": 2.0, "version": 3, "tenant": a, "initial": False},
              {"kind": "adapter", "time_s": 2.5, "version": 9, "initial": False}]  # the shared lineage's
    stats = tenant_alignment(records, events)
    assert stats is not None
    assert (stats["tenants"], stats["scored"], stats["leaks"]) == (3, 7, 2)
    assert stats["mean_exact"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert (stats["min_exact"], stats["min_tenant"]) == (0.0, c)
    assert stats["per_tenant"][a] == {"n": 4.0, "exact": 0.75, "prefix": 0.75, "leaks": 0, "version": 3,
                                      "publishes": 1}
    assert stats["per_tenant"][b]["leaks"] == 1 and stats["per_tenant"][c]["leaks"] == 1
    assert [(e["tenant"], e["leaked"]) for e in stats["leak_examples"]] == [(b, ["Mothball"]), (c, ["Zorblax"])]
    assert tenant_alignment([record("Zorblax", tenant=None)]) is None
    summary = summarize(records, events=events)
    assert summary["tenants"] == stats
    assert summary["adapter_publishes"] == [{"time_s": 2.5, "version": 9}]  # tenants' publishes are not the shared's
    table = comparison_table({"run": summary})
    assert "| tenants during the trace: exact match mean / lowest (tenant) | 41.7% / 0.0% (tenant-02) |" in table
    assert "| tenants during the trace: cross-tenant leaks (answers / scored) | 2 / 7 |" in table
    assert "| tenant adapter publishes seen (tenants / publishes) | 1 / 1 |" in table
    assert "| tenant tenant-00: exact during the trace (n) / after | 75.0% (4) / - |" in table
    assert "| tenant tenant-01: exact during the trace (n) / after | 50.0% (2) / -, leaks 1 / 0 |" in table
    assert "tenant" not in comparison_table({"run": summarize([record("x", tenant=None)])})


async def serve_fake(shared: bool) -> AsyncIterator[tuple[str, web.Application]]:
    app = fake_app(chunk_delay_s=0.0, teachable=True, shared=shared)
    runner, url = await serve_app(app)
    try:
        yield url, app
    finally:
        await runner.cleanup()


@pytest.fixture
async def per_tenant_fake() -> AsyncIterator[tuple[str, web.Application]]:
    async for pair in serve_fake(shared=False):
        yield pair


@pytest.fixture
async def shared_fake() -> AsyncIterator[tuple[str, web.Application]]:
    async for pair in serve_fake(shared=True):
        yield pair


SMALL = DriftSpec(seed=2, phases=2, phase_s=20.0, rate=2.0, feedback_fraction=1.0, tenants=4, chatters=2)


def small_trace() -> list[TraceItem]:
    return builtin("tenants", SMALL)


async def run_small(url: str) -> dict[str, object]:
    # One closed-loop feedback user: the requests and corrections go one after another, in trace order.
    items = small_trace()
    config = RunConfig(url=url, users=1, requests=len(items), mix={"feedback": 1.0}, poll_s=0)
    result = await Runner(config, items).run()
    assert all(r.ok for r in result.records), [r.error for r in result.records if not r.ok]
    return summarize(result.records, events=result.events)


async def test_requests_and_feedback_carry_the_tenant_and_nothing_leaks(
        per_tenant_fake: tuple[str, web.Application]) -> None:
    url, app = per_tenant_fake
    items = small_trace()
    summary = await run_small(url)
    tenants = {item.tenant for item in items if item.tenant}
    seen = app[SEEN]
    assert seen["chat"] == [item.tenant for item in items]  # `user` on every tenant request, none on chat
    assert set(seen["feedback"]) == tenants and len(seen["feedback"]) == sum(bool(i.feedback) for i in items)
    stats = summary["tenants"]
    assert isinstance(stats, dict)
    assert stats["leaks"] == 0 and stats["tenants"] == 4
    assert 0.0 < stats["min_exact"] <= stats["mean_exact"] < 1.0  # right once taught, not before
    assert all(s["publishes"] > 0 for s in stats["per_tenant"].values())  # each tenant's versions, apart
    final = await final_alignment(url, items)
    assert final["n"] == 4 * len(ATTRIBUTES) and final["exact"] == 1.0  # every pair was asked and taught
    assert final["tenants"]["leaks"] == 0 and final["tenants"]["min_exact"] == 1.0
    assert final["tenants"]["min_taught"] == 1.0  # what it answered was all taught
    assert seen["chat"][-16:].count(None) == 0  # the probe asks as each tenant


async def test_a_shared_lineage_leaks(shared_fake: tuple[str, web.Application]) -> None:
    url, _ = shared_fake
    summary = await run_small(url)
    stats = summary["tenants"]
    assert isinstance(stats, dict) and stats["leaks"] > 0
    final = await final_alignment(url, small_trace())
    # One answer per question for everyone: the last tenant who taught it is right, the 3 others leak.
    assert final["tenants"]["leaks"] == 3 * len(ATTRIBUTES)
    assert final["tenants"]["mean_exact"] == pytest.approx(0.25)


async def test_compare_reports_tenants(tmp_path: Path) -> None:
    items = small_trace()
    command = (sys.executable, "-m", "tests.loadgen.fake_server", "--port", "{port}", "--teachable")
    spec = ServerSpec(model="fake", command=command, ready_timeout_s=60.0, extra_env={"PYTHONPATH": str(ROOT)})
    run = RunConfig(url="", arrival="replay", time_scale=0.005, poll_s=0)
    result = await compare(["none", "mace"], items, spec, run, tmp_path, {}, progress=False, trace_name="tenants")
    assert list(result["summaries"]) == ["none", "mace"]
    table = (tmp_path / "compare.md").read_text()
    assert "| tenants after the trace: exact match mean / lowest (tenant) | 0.0% / 0.0% (tenant-00) | " \
           "100.0% / 100.0% (tenant-00) |" in table
    assert "| tenants after the trace: cross-tenant leaks (answers / scored) | 0 / 16 | 0 / 16 |" in table
    for tenant in tenant_names(4):
        assert f"| tenant {tenant}: exact during the trace (n) / after |" in table


def test_the_probe_counts_per_tenant_the_facts_it_taught() -> None:
    a, b = "tenant-00", "tenant-01"
    cat, city = question("cat"), question("city")
    asked = [TraceItem(id=f"q{i}", time=0.0, messages=messages, max_tokens=8, reference=value, tenant=tenant,
                       other_answers=[])
             for i, (tenant, messages, value) in enumerate([(a, cat, "Zorblax"), (a, city, "Graz"),
                                                            (b, cat, "Pixel"), (b, city, "Porto")])]
    taught = {question_key(cat): {a: {"Zorblax"}, b: {"Nimbus"}}, question_key(city): {a: {"Graz"}}}
    tenants = {"per_tenant": {a: {}, b: {}}}
    add_taught(tenants, asked, taught)
    # b taught its cat another name (since changed) and never its city: nothing it is asked was taught.
    assert tenants["per_tenant"][a]["taught"] == 1.0 and tenants["per_tenant"][b]["taught"] == 0.0
    assert tenants["mean_taught"] == 0.5 and tenants["min_taught"] == 0.0


def test_a_sample_without_user_teaches_for_its_items_tenant() -> None:
    # The personalization trace's `--user-tenants` items carry the tenant; the runner sends their samples
    # with it as `user`, and a sample's own `user` wins.
    cat = question("cat")
    items = [TraceItem(id="a", time=0.0, messages=cat, max_tokens=8, reference="Zorblax", tenant="Ana",
                       feedback=[{"messages": [*cat, {"role": "assistant", "content": "Zorblax"}]}]),
             TraceItem(id="b", time=1.0, messages=cat, max_tokens=8, reference="Pixel", tenant="Ana",
                       feedback=[{"user": "Bo", "messages": [*cat, {"role": "assistant", "content": "Pixel"}]}])]
    assert taught_by_all(items) == {question_key(cat): {"Ana": {"Zorblax"}, "Bo": {"Pixel"}}}
