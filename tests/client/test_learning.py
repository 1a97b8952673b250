"""The SDK's learning calls (feedback, corrections, journal counts, adapter versions) against a real mace
server with API keys, over HTTP and the websocket: what they return, what the journal then holds, and
the typed error of each refusal (403 scope, 429 rate with its retry delay, 503 journal unavailable)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mace.client import (
    AdapterList,
    AsyncClient,
    BadRequestError,
    ChatResult,
    FeedbackCounts,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from mace.model.loader import ModelBundle
from mace.server.auth import hash_key
from tests.conftest import RunningServer, start_server, tiny_config

TRAINER, READER, ADMIN = "sk-trainer-0001", "sk-reader-0002", "sk-admin-0003"
FEEDER = "sk-feeder-0007"  # train only: feedback, but not the infer routes (adapters list)
# One key per rate test, so that no test finds a bucket another one emptied.
SLOW_HTTP, SLOW_WS, RETRIED = "sk-slow-http-0004", "sk-slow-ws-0005", "sk-retried-0006"
THROTTLED = "sk-throttled-0008"  # one request a minute after the burst
ACTOR = "sk-actor-0009"  # acts for its end users (OpenAI's `user`)
REQUESTS_BURST = 20
MESSAGES = [{"role": "user", "content": "What is the name of my cat?"}]
SAMPLE = {"prompt": "colour of the sky?", "completion": "blue"}


@pytest.fixture(scope="module")
async def keyed(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    def key(secret: str, scopes: list[str], samples_per_minute: float = 60000,
            requests_per_minute: float = 60000) -> dict[str, Any]:
        return {"sha256": hash_key(secret), "name": secret, "scopes": scopes,
                "samples_per_minute": samples_per_minute, "requests_per_minute": requests_per_minute}

    keys = [key(TRAINER, ["infer", "train"]), key(READER, ["infer"]), key(ADMIN, ["admin"]), key(FEEDER, ["train"]),
            key(SLOW_HTTP, ["infer", "train"], 60), key(SLOW_WS, ["infer", "train"], 60),
            key(RETRIED, ["infer", "train"], 30), key(THROTTLED, ["infer", "train"], requests_per_minute=1),
            key(ACTOR, ["infer", "train", "act_for_users"])]
    server = {"api_keys": keys, "samples_burst": 4, "requests_burst": REQUESTS_BURST}
    config = tiny_config(tmp_path_factory.mktemp("learning"), server=server, train={"policy": "none"})
    runner, url = await start_server(config, tiny_bundle)
    yield RunningServer(url=url, app=runner.app)
    await runner.cleanup()


@pytest.fixture
async def trainer(keyed: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(keyed.url, api_key=TRAINER, timeout_s=30.0) as client:
        yield client


def stored(server: RunningServer, sample_id: int) -> dict[str, Any]:
    """The journal's row for a sample: what the server made of it."""
    journal = server.runtime.journal
    assert journal is not None
    with journal._lock:
        row = journal._db.execute(
            "SELECT prompt, completion, request_id, weight, tenant FROM samples WHERE id = ?", (sample_id,)
        ).fetchone()
    assert row is not None, f"sample {sample_id} is not in the journal"
    return dict(zip(("prompt", "completion", "request_id", "weight", "tenant"), row, strict=True))


@contextmanager
def read_only_journal(server: RunningServer) -> Iterator[None]:
    """What SQLite answers on a read-only file or mount: every write fails, reads still work."""
    journal = server.runtime.journal
    assert journal is not None
    db: sqlite3.Connection = journal._db
    db.execute("PRAGMA query_only = ON")
    try:
        yield
    finally:
        db.execute("PRAGMA query_only = OFF")


# ---- HTTP ----


async def test_feedback_one_or_many_and_the_counts(keyed: RunningServer, trainer: AsyncClient) -> None:
    before = await trainer.feedback_counts()
    [first] = await trainer.feedback(SAMPLE)
    conversation = {"messages": [*MESSAGES, {"role": "assistant", "content": "Zorblax."}]}
    more = await trainer.feedback([conversation, {**SAMPLE, "weight": 3.0, "request_id": "chatcmpl-x"}])
    assert len(more) == 2 and first < more[0] < more[1]
    assert stored(keyed, first)["completion"] == "blue"
    assert stored(keyed, more[0])["completion"] == "Zorblax." and "my cat" in stored(keyed, more[0])["prompt"]
    assert stored(keyed, more[1]) | {"prompt": ""} == {"prompt": "", "completion": "blue",
                                                      "request_id": "chatcmpl-x", "weight": 3.0,
                                                      "tenant": TRAINER}
    after = await trainer.feedback_counts()
    assert isinstance(after, FeedbackCounts)
    assert after.total == before.total + 3
    assert after.pending + after.trained + after.held_out == after.total
    assert after.training is not True  # the server runs without a training policy


async def test_correct_carries_the_conversation_and_request_id(keyed: RunningServer, trainer: AsyncClient) -> None:
    result = await trainer.chat(MESSAGES, max_tokens=3, temperature=0)
    assert result.messages == tuple(MESSAGES)
    [sample_id] = await trainer.correct(result, "Your cat is called Zorblax.", weight=2.0)
    row = stored(keyed, sample_id)
    assert row["request_id"] == result.request_id and result.request_id.startswith("chatcmpl-")
    assert row["completion"] == "Your cat is called Zorblax." and row["weight"] == 2.0
    assert "my cat" in row["prompt"]

    async with trainer.chat(MESSAGES, stream=True, max_tokens=3, temperature=0) as stream:
        _ = [text async for text in stream]
    [streamed_id] = await trainer.correct(stream.result, "Zorblax.")
    assert stored(keyed, streamed_id)["request_id"] == stream.result.request_id


def test_correction_sample_shape() -> None:
    result = ChatResult("Tom", "stop", None, 0, "chatcmpl-1", "m", messages=tuple(MESSAGES))
    assert result.correction("Zorblax", weight=2.0, user="alice") == {
        "messages": [*MESSAGES, {"role": "assistant", "content": "Zorblax"}],
        "request_id": "chatcmpl-1", "weight": 2.0, "user": "alice",
    }
    with pytest.raises(ValueError, match="conversation"):
        ChatResult("Tom", "stop", None, 0, "chatcmpl-1", "m").correction("Zorblax")


async def test_feedback_errors_are_typed(keyed: RunningServer, trainer: AsyncClient) -> None:
    async with AsyncClient(keyed.url, api_key=READER) as reader:
        with pytest.raises(PermissionDeniedError) as denied:
            await reader.feedback(SAMPLE)
        assert (denied.value.status, denied.value.code) == (403, "insufficient_scope")
    with pytest.raises(BadRequestError) as bad:
        await trainer.feedback({"prompt": "only a prompt"})
    assert bad.value.status == 400
    with pytest.raises(TypeError):
        await trainer.feedback("not a sample")  # type: ignore[arg-type]


async def test_rate_limit_is_429_with_its_retry_delay(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=SLOW_HTTP, max_retries=0) as client:
        assert len(await client.feedback([SAMPLE] * 4)) == 4  # the burst; one more each second
        with pytest.raises(RateLimitError) as limited:
            await client.feedback(SAMPLE)
    assert (limited.value.status, limited.value.code) == (429, "rate_limit_exceeded")
    assert limited.value.retry_after_s is not None and limited.value.retry_after_s >= 1


async def test_a_429_is_retried_after_its_delay_without_storing_twice(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=RETRIED) as client:
        before = (await client.feedback_counts()).total
        await client.feedback([SAMPLE] * 4)
        started = time.monotonic()
        [sample_id] = await client.feedback(SAMPLE)  # refused first (Retry-After: 2), admitted after the wait
        assert time.monotonic() - started >= 1.5  # it waited as told, rather than being admitted at once
        assert stored(keyed, sample_id)["completion"] == "blue"
        assert (await client.feedback_counts()).total == before + 5


async def test_journal_unavailable_is_503_and_stores_nothing(keyed: RunningServer, trainer: AsyncClient) -> None:
    before = (await trainer.feedback_counts()).total
    with read_only_journal(keyed):
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as unavailable:
            await trainer.feedback(SAMPLE)
        # 30 s is past the client's max_retry_wait_s: the caller decides, at once.
        assert time.monotonic() - started < 5.0
        assert (unavailable.value.status, unavailable.value.code) == (503, "journal_unavailable")
        assert unavailable.value.retry_after_s == 30
        async with trainer.ws_chat() as session:
            with pytest.raises(ServiceUnavailableError) as over_ws:
                await session.feedback(SAMPLE)
            assert (over_ws.value.code, over_ws.value.retry_after_s) == ("journal_unavailable", 30)
        assert (await trainer.feedback_counts()).total == before  # counts are reads: still answered
    assert len(await trainer.feedback(SAMPLE)) == 1


async def test_adapters_and_activate(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=READER) as reader:
        adapters = await reader.adapters()
        assert isinstance(adapters, AdapterList)
        assert adapters.active == 0 and adapters.auto_publish is False  # nothing trains on this server
        [base] = adapters.versions
        assert (base.version, base.name, base.is_active, base.learner_loss) == (0, "base", True, None)
        assert adapters.newest == base
        with pytest.raises(PermissionDeniedError):
            await reader.activate(0)
    async with AsyncClient(keyed.url, api_key=ADMIN) as admin:
        assert await admin.activate(0) == 0
        with pytest.raises(NotFoundError) as missing:
            await admin.activate(7)
        assert (missing.value.code, missing.value.param) == ("adapter_not_found", "version")
        with pytest.raises(ValueError):
            await admin.activate(-1)


async def test_acting_for_end_users(keyed: RunningServer, trainer: AsyncClient) -> None:
    async with AsyncClient(keyed.url, api_key=ACTOR) as actor:
        assert (await actor.chat(MESSAGES, max_tokens=2, user="carol")).usage is not None
        carol, dave = await actor.feedback([SAMPLE, {**SAMPLE, "user": "dave"}], user="carol")
        assert (stored(keyed, carol)["tenant"], stored(keyed, dave)["tenant"]) == (f"{ACTOR}/carol", f"{ACTOR}/dave")
        assert (await actor.adapters(user="carol")).tenant == f"{ACTOR}/carol"
        assert (await actor.adapters()).tenant == ACTOR
        assert await actor.activate(0, tenant=f"{ACTOR}/carol") == 0
        with pytest.raises(PermissionDeniedError) as other:
            await actor.adapters(tenant=TRAINER)
        assert other.value.code == "forbidden_tenant"
        async with actor.ws_chat() as session:
            conversation = session.chat(MESSAGES, max_tokens=2, user="carol")
            _ = [text async for text in conversation]
            [sample_id] = await session.feedback(SAMPLE, user="carol")
            assert stored(keyed, sample_id)["tenant"] == f"{ACTOR}/carol"
    with pytest.raises(PermissionDeniedError) as denied:
        await trainer.chat(MESSAGES, max_tokens=2, user="carol")  # a key without act_for_users
    assert denied.value.code == "insufficient_scope"
    with pytest.raises(PermissionDeniedError):
        await trainer.feedback(SAMPLE, user="carol")


async def test_reads_need_their_scopes(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=READER) as reader:
        with pytest.raises(PermissionDeniedError) as denied:
            await reader.feedback_counts()  # the journal is the train scope's
        assert denied.value.code == "insufficient_scope"
    async with AsyncClient(keyed.url, api_key=FEEDER) as feeder:
        assert (await feeder.feedback_counts()).total >= 0
        with pytest.raises(PermissionDeniedError):
            await feeder.adapters()  # versions are the infer scope's


async def test_request_rate_limit_on_reads(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=THROTTLED) as client:
        for _ in range(REQUESTS_BURST):
            await client.adapters()
        for call in (client.adapters, client.feedback_counts):
            started = time.monotonic()
            with pytest.raises(RateLimitError) as limited:
                await call()
            # A minute is past the client's max_retry_wait_s: raised at once, for the caller to decide.
            assert time.monotonic() - started < 5.0
            assert limited.value.retry_after_s is not None and limited.value.retry_after_s > 10


async def test_closed_journal_is_503_for_feedback_and_counts(keyed: RunningServer, trainer: AsyncClient) -> None:
    runtime = keyed.runtime
    journal, runtime.journal, runtime.journal_error = runtime.journal, None, "OSError: no space left on device"
    try:
        for call in (lambda: trainer.feedback(SAMPLE), trainer.feedback_counts):
            with pytest.raises(ServiceUnavailableError) as unavailable:
                await call()
            assert unavailable.value.code == "journal_unavailable" and "no space" in unavailable.value.message
            assert unavailable.value.retry_after_s == 30
    finally:
        runtime.journal, runtime.journal_error = journal, None


# ---- websocket ----


async def test_ws_feedback_and_correction(keyed: RunningServer, trainer: AsyncClient) -> None:
    async with trainer.ws_chat() as session:
        conversation = session.chat(MESSAGES, max_tokens=3, temperature=0)
        _ = [text async for text in conversation]
        [sample_id] = await session.correct(conversation.result, "Zorblax.")
        row = stored(keyed, sample_id)
        assert row["request_id"] == conversation.id and row["completion"] == "Zorblax."
        ids = await session.feedback([SAMPLE, {**SAMPLE, "completion": "grey"}])
        assert len(ids) == 2 and ids[0] > sample_id
        with pytest.raises(BadRequestError) as bad:
            await session.feedback({"prompt": "no answer"})
        assert bad.value.status == 400
        assert await session.ping() >= 0  # the socket still works


async def test_ws_feedback_without_the_train_scope(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=READER) as reader, reader.ws_chat() as session:
        with pytest.raises(PermissionDeniedError) as denied:
            await session.feedback(SAMPLE)
        assert (denied.value.status, denied.value.code) == (403, "insufficient_scope")
        conversation = session.chat(MESSAGES, max_tokens=2)  # chat on the same socket still works
        _ = [text async for text in conversation]
        assert conversation.result.usage is not None


async def test_ws_feedback_rate_limit(keyed: RunningServer) -> None:
    async with AsyncClient(keyed.url, api_key=SLOW_WS, max_retries=0) as client, client.ws_chat() as session:
        assert len(await session.feedback([SAMPLE] * 4)) == 4
        with pytest.raises(RateLimitError) as limited:
            await session.feedback(SAMPLE)
        assert limited.value.code == "rate_limit_exceeded"
        assert limited.value.retry_after_s is not None and limited.value.retry_after_s >= 1


# ---- parsing: unknown fields are ignored, what is known is typed ----


def test_counts_and_adapters_parse_tolerantly() -> None:
    counts = FeedbackCounts.from_payload({"object": "feedback.counts", "total": 5, "pending": 2, "trained": 2,
                                          "held_out": 1, "cursor": 4, "training": "on", "policy": "mace"})
    assert counts == FeedbackCounts(5, 2, 2, 1, 4, training=True)
    assert FeedbackCounts.from_payload({"total": 0}).training is None
    with pytest.raises(ValueError):
        FeedbackCounts.from_payload({"pending": 1})
    adapters = AdapterList.from_payload({
        "object": "list", "active": 1, "auto_publish": False, "tenant": None,
        "data": [{"version": 0, "name": "base", "serving_loss": None, "learner_loss": None, "active": False},
                 {"version": 1, "created_at": 1.5, "serving_loss": 2.5, "learner_loss": float("nan"),
                  "num_optimizer_steps": 8, "reason": "publish", "active": True, "new_field": [1]}],
    })
    assert adapters.active == 1 and adapters.auto_publish is False
    assert adapters.newest.version == 1 and adapters.newest.is_active
    assert (adapters.newest.serving_loss, adapters.newest.learner_loss) == (2.5, None)
    assert adapters.newest.num_optimizer_steps == 8 and adapters.newest.reason == "publish"
