"""The runner against a scripted fake server: error events, missing endpoints, stopping on time."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from loadgen.arrivals import constant
from loadgen.context import Recorder, RunContext, Workload
from loadgen.metrics import RequestRecord, summarize
from loadgen.runner import RunConfig, Runner
from loadgen.traces import TraceItem
from loadgen.users import ChatUser, FeedbackUser, task

from mace.client import AsyncClient


def items(count: int, fail_every: int = 0) -> list[TraceItem]:
    out = []
    for index in range(count):
        text = "FAIL" if fail_every and index % fail_every == 0 else "hello"
        out.append(TraceItem(
            id=f"t{index}", time=index * 0.01, messages=[{"role": "user", "content": text}], phase=index % 2,
            reference="ok fine done", feedback=[{"prompt": text, "completion": "ok"}],
        ))
    return out


async def test_error_events_fail_and_missing_feedback_endpoint_does_not_stop_the_run(fake_url: str) -> None:
    config = RunConfig(url=fake_url, users=3, requests=9, mix={"feedback": 1.0}, poll_s=0.05)
    result = await Runner(config, items(9, fail_every=3)).run()
    generations = [r for r in result.records if r.kind == "chat"]
    assert len(generations) == 9
    failed = [r for r in generations if not r.ok]
    assert len(failed) == 3 and {r.status for r in failed} == {"error_event"}
    assert all("engine failed" in (r.error or "") for r in failed)
    for record in generations:
        if record.ok:
            assert record.answer == "ok fine done" and record.output_tokens == 3
            assert record.adapter_version == 5 and record.request_id == "chatcmpl-f"
            assert record.ttft_s is not None and record.e2e_s is not None and record.ttft_s <= record.e2e_s
            assert len(record.itl_s) == 2 and all(gap > 0.005 for gap in record.itl_s)
    feedback = [r for r in result.records if r.kind == "feedback"]
    assert len(feedback) == 9 and {r.status for r in feedback} == {"http_404"}
    summary = summarize(result.records, {"ttft": 5.0})
    assert (summary["ok"], summary["failed"], summary["failures"]) == (6, 3, {"error_event": 3})
    assert summary["feedback"] == {"sent": 9, "ok": 0}
    assert summary["slo_attainment"]["all"] == pytest.approx(6 / 9)
    assert summary["alignment"]["0"]["exact"] == 1.0  # every ok answer is the reference
    # The adapter version came from the fingerprints: /v1/adapters is a 404 here.
    assert [e["version"] for e in result.events] == [5]


async def test_adapter_polling_stops_at_a_404(fake_url: str) -> None:
    config = RunConfig(url=fake_url, requests=1, poll_s=0.01)
    async with AsyncClient(fake_url) as client:
        ctx = RunContext(client, Workload(items(1)), Recorder())
        await asyncio.wait_for(Runner(config, items(1))._poll_adapters(ctx), 10)  # returns: it stopped asking
    assert ctx.recorder.events == []


async def test_unreachable_feedback_is_a_connection_failure() -> None:
    async with AsyncClient("http://127.0.0.1:9", timeout_s=5.0) as client:  # nothing listens on the discard port
        ctx = RunContext(client, Workload(items(1)), Recorder())
        user = FeedbackUser(ctx, "f")
        item = items(1)[0]
        await user.after(item, RequestRecord(request_id="chatcmpl-1", kind="chat"))
    [sent] = ctx.recorder.records
    assert (sent.kind, sent.status, sent.request_id) == ("feedback", "connection", "fb-chatcmpl-1")
    assert sent.error and sent.e2e_s is not None


async def test_duration_stops_the_run_and_cancels_stragglers(slow_fake_url: str) -> None:
    # Each stream takes ~6 s; the run stops at 0.3 s and waits 0.2 s for those in flight, so it ends
    # well before any stream could (the bound leaves a loaded machine seconds of room).
    config = RunConfig(url=slow_fake_url, users=2, duration_s=0.3, grace_s=0.2, mix={"chat": 1.0}, poll_s=0)
    started = time.monotonic()
    result = await Runner(config, items(5)).run()
    assert time.monotonic() - started < 4.0
    assert [r.status for r in result.records] == ["cancelled", "cancelled"]
    summary = summarize(result.records)
    assert summary["cancelled"] == 2 and summary["requests"] == 0


@pytest.mark.parametrize("arrival", ["poisson", "bursty", "replay"])
async def test_open_loop_arrivals(fake_url: str, arrival: str) -> None:
    config = RunConfig(url=fake_url, arrival=arrival, rate=50.0, requests=6, mix={"chat": 1.0}, poll_s=0)  # type: ignore[arg-type]
    result = await Runner(config, items(10)).run()
    assert [r.status for r in result.records] == ["ok"] * 6
    arrivals = sorted(r.arrival_s for r in result.records)
    if arrival == "replay":  # the trace's clock: items are 10 ms apart
        assert arrivals == pytest.approx([i * 0.01 for i in range(6)])
    assert [r.trace_id for r in sorted(result.records, key=lambda r: r.arrival_s)] == [f"t{i}" for i in range(6)]


def test_runner_needs_an_end() -> None:
    with pytest.raises(ValueError, match="duration or a request count"):
        Runner(RunConfig(url="http://x"), items(1))


class Pinger(ChatUser):
    """A locust-style user: the inherited `ask` (weight 1) and its own weighted task."""

    weight = 2.0
    wait_time = constant(0.0)

    @task(3)
    async def note(self) -> None:
        self.notes = getattr(self, "notes", 0) + 1


async def test_custom_user_classes_and_think_time(fake_url: str) -> None:
    config = RunConfig(url=fake_url, users=1, requests=3, wait=(0.1, 0.1), poll_s=0)
    ticks: list[int] = []
    runner = Runner(config, items(5), on_tick=lambda ctx: ticks.append(len(ctx.recorder.records)),
                    user_types=[Pinger])
    assert runner.classes == [(Pinger, 2.0)]
    result = await runner.run()
    starts = sorted(r.start_s for r in result.records)
    assert len(starts) == 3 and all(b - a >= 0.1 for a, b in itertools.pairwise(starts))  # the think time
    assert {r.user for r in result.records} == {"Pinger-0"} and ticks and ticks[-1] == 3
    user = Pinger(None, "p")  # type: ignore[arg-type]  # tasks do not need the context to be listed
    assert [(fn.__name__, weight) for fn, weight in user.tasks] == [("ask", 1.0), ("note", 3.0)]
