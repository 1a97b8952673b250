"""`compare` with a fake server process per policy: the table, the per-policy files, a failed start."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loadgen.__main__ import main
from loadgen.compare import ServerSpec, compare
from loadgen.plots import available as plots_available
from loadgen.report import comparison_table
from loadgen.runner import RunConfig
from loadgen.traces import DriftSpec, builtin

ROOT = Path(__file__).resolve().parents[2]


async def test_compare_runs_each_policy_and_reports_a_broken_one(tmp_path: Path) -> None:
    items = builtin("personalization", DriftSpec(seed=1, phase_s=5.0, rate=4.0))[:8]
    command = (sys.executable, "-m", "tests.loadgen.fake_server", "--port", "{port}")
    # PYTHONPATH: the fake is this test package's module, whatever directory pytest runs from.
    spec = ServerSpec(model="fake", command=command, ready_timeout_s=60.0, extra_env={"PYTHONPATH": str(ROOT)})
    run = RunConfig(url="", arrival="replay", time_scale=0.01, poll_s=0)
    stale = tmp_path / "mace" / "data" / "journal.sqlite3"  # an earlier run's, which must not carry over
    stale.parent.mkdir(parents=True)
    stale.write_text("old feedback")
    result = await compare(["none", "broken", "mace"], items, spec, run, tmp_path, {"ttft": 2.0}, progress=False,
                           trace_name="personalization")
    assert list(result["summaries"]) == ["none", "mace"]
    assert all(s["ok"] == 8 for s in result["summaries"].values())
    table = (tmp_path / "compare.md").read_text()
    assert "| metric | none | mace |" in table and "broken: the server exited with 2" in table
    training = result["summaries"]["mace"]["training"]  # scraped from the fake's /metrics before it stopped
    assert training["train_tokens"] == 300 and training["optimizer_steps"] == 3
    assert "| held-out loss at the end (serving / learner) | - | 2.50 / - |" in table  # none never trained
    # Each policy's final version is asked the last phase's questions once more (the fake never answers right).
    last = max(item.phase for item in items)
    asked = len({json.dumps(item.messages) for item in items if item.phase == last and item.reference})
    assert asked > 0
    final_row = "| alignment after the trace: last phase's questions again (exact, answered / asked) |"
    assert f"{final_row} 0.0%, {asked} / {asked} | 0.0%, {asked} / {asked} |" in table
    assert "invalid configuration" in (tmp_path / "broken" / "server.log").read_text()
    for policy in ("none", "mace"):
        assert (tmp_path / policy / "requests.jsonl").exists() and (tmp_path / policy / "summary.md").exists()
    assert not stale.exists()
    assert (tmp_path / "alignment_over_time.png").exists() or not plots_available()


def test_comparison_table_fills_missing_rows() -> None:
    from loadgen.metrics import summarize

    empty = summarize([])
    table = comparison_table({"a": empty, "b": {**empty, "alignment": {"0": {"n": 1.0, "exact": 1.0, "prefix": 1.0}}}})
    assert "| alignment phase 0 (exact / prefix, n) | - | 100.0% / 100.0%, 1 |" in table


def test_trace_command_writes_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    assert main(["trace", "--trace", "moderation", "--seed", "2", "--phase-seconds", "5", "--out", str(out)]) == 0
    assert out.read_text().count("\n") > 5
