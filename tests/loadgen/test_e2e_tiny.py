"""Short end-to-end runs against a real mace server with the tiny model (in-process)."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
from loadgen.__main__ import parser, run_command
from loadgen.metrics import summarize
from loadgen.plots import available as plots_available
from loadgen.report import read_records
from loadgen.runner import RunConfig, Runner
from loadgen.traces import DriftSpec, builtin


async def test_every_user_kind_against_the_tiny_server(tiny_url: str) -> None:
    items = builtin("personalization", DriftSpec(seed=3, feedback_fraction=1.0, max_tokens=4))
    config = RunConfig(url=tiny_url, users=4, requests=12, mix={"chat": 1, "completion": 1, "ws": 1, "feedback": 1})
    result = await Runner(config, items).run()
    generations = [r for r in result.records if r.kind != "feedback"]
    assert len(generations) == 12
    assert {r.kind for r in generations} == {"chat", "completion", "ws"}
    for record in generations:
        assert record.ok, record.error
        assert record.output_tokens == 4 and record.prompt_tokens and record.adapter_version is not None
        assert record.e2e_s is not None and record.e2e_s > 0
        assert record.request_id.startswith(("chatcmpl-", "cmpl-", "ws-"))
    # The feedback user corrected each of its requests; the tiny server accepts feedback.
    feedback = [r for r in result.records if r.kind == "feedback"]
    assert feedback and len(feedback) == sum(r.user.startswith("FeedbackUser") for r in generations)
    assert all(r.ok for r in feedback), [r.error for r in feedback]
    summary = summarize(result.records, {"ttft": 30.0})
    assert summary["ok"] == 12 and summary["slo_attainment"]["all"] == 1.0
    assert summary["alignment"]["0"]["n"] == 12.0


async def test_cli_run_replays_a_trace_and_writes_the_results(tiny_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = parser().parse_args([
        "run", "--url", tiny_url, "--trace", "moderation", "--arrival", "replay", "--time-scale", "0.02",
        "--phase-seconds", "10", "--requests", "10", "--max-tokens", "3", "--slo", "ttft=5,tpot=1",
        "--no-progress", "--out", str(out),
    ])
    summary = await run_command(args)
    assert summary["requests"] == 10 and summary["ok"] == 10
    assert set(summary["slo"]) == {"ttft", "tpot"}
    names = {path.name for path in out.iterdir()}
    assert {"requests.jsonl", "requests.csv", "events.jsonl", "summary.json", "summary.md"} <= names
    if plots_available():  # matplotlib is optional: without it no plot is written
        assert {"latency_cdf.png", "latency_over_time.png", "alignment_over_time.png"} <= names
    records = read_records(out / "requests.jsonl")
    assert len([r for r in records if r.kind == "chat"]) == 10
    with (out / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) and rows[0]["status"] == "ok"
    assert orjson.loads((out / "summary.json").read_bytes())["ok"] == 10
    assert "| TTFT p50 / p90 / p99 (ms) |" in (out / "summary.md").read_text()


async def test_tenants_trace_against_the_tiny_server(tiny_url: str) -> None:
    # Every user kind sends the tenant as `user`; the server takes it on generation and on feedback.
    spec = DriftSpec(seed=4, phases=1, feedback_fraction=1.0, max_tokens=4, tenants=4, chatters=2)
    items = [item for item in builtin("tenants", spec) if item.tenant is not None][:8]
    config = RunConfig(url=tiny_url, users=4, requests=8, mix={"completion": 1, "ws": 1, "feedback": 2})
    result = await Runner(config, items).run()
    assert all(r.ok for r in result.records), [r.error for r in result.records if not r.ok]
    feedback = [r for r in result.records if r.kind == "feedback"]
    assert feedback and all(r.tenant is not None for r in feedback)
    summary = summarize(result.records)
    assert summary["tenants"] is not None and summary["tenants"]["scored"] == 8
