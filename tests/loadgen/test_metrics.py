"""The summary's numbers against values computed by hand (see each test's comments)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from loadgen.context import Recorder
from loadgen.metrics import (
    RequestRecord,
    alignment,
    exact_match,
    meets_slo,
    parse_slo,
    percentile,
    prefix_match,
    run_duration,
    summarize,
)


def rec(**fields: object) -> RequestRecord:
    base: dict[str, object] = {"request_id": "r", "kind": "chat"}
    return RequestRecord(**{**base, **fields})  # type: ignore[arg-type]


RECORDS = [
    # TPOT = (0.5 - 0.1) / (5 - 1) = 0.1
    rec(request_id="a", phase=0, arrival_s=0.0, start_s=0.0, ttft_s=0.1, itl_s=[0.1] * 4, e2e_s=0.5,
        output_tokens=5, reference="blue", answer="Blue."),
    # TPOT = (1.3 - 0.3) / (3 - 1) = 0.5
    rec(request_id="b", phase=0, arrival_s=1.0, start_s=1.0, ttft_s=0.3, itl_s=[0.5, 0.5], e2e_s=1.3,
        output_tokens=3, reference="Paris", answer="paris is nice"),
    # one output token: no TPOT
    rec(request_id="c", kind="ws", phase=1, arrival_s=2.0, start_s=2.0, ttft_s=2.0, e2e_s=2.0, output_tokens=1,
        reference="block", answer=" block"),
    # a stream that ended with an error event: failed, whatever it measured
    rec(request_id="d", phase=1, arrival_s=3.0, start_s=3.0, ttft_s=0.2, e2e_s=0.4, output_tokens=None,
        status="error_event", reference="allow", answer="al"),
    rec(request_id="f", kind="feedback", phase=1, arrival_s=3.5, start_s=3.5, e2e_s=0.01),
]


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # between 2 and 3
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    rng = random.Random(1)
    for _ in range(20):
        values = [rng.expovariate(1.0) for _ in range(rng.randint(1, 50))]
        for p in (50, 90, 99):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_tpot_and_slo_per_request() -> None:
    assert RECORDS[0].tpot_s == pytest.approx(0.1)
    assert RECORDS[1].tpot_s == pytest.approx(0.5)
    assert RECORDS[2].tpot_s is None
    slo = {"ttft": 1.0, "tpot": 0.2}
    assert [meets_slo(r, slo) for r in RECORDS[:4]] == [True, False, False, False]
    assert meets_slo(rec(ttft_s=None, e2e_s=1.0), {"ttft": 1.0}) is False  # no token at all
    assert meets_slo(rec(ttft_s=0.5, e2e_s=3.0, output_tokens=1), {"e2e": 2.0}) is False


def test_summary_matches_hand_computed_values() -> None:
    summary = summarize(RECORDS, {"ttft": 1.0, "tpot": 0.2}, duration_s=10.0)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (4, 3, 1)
    assert summary["failures"] == {"error_event": 1}
    assert summary["throughput_rps"] == pytest.approx(0.3)  # 3 ok / 10 s
    assert summary["output_tokens"] == 9 and summary["output_tok_s"] == pytest.approx(0.9)
    ttft = summary["ttft_s"]  # ok requests only: [0.1, 0.3, 2.0]
    assert ttft["p50"] == pytest.approx(0.3)
    assert ttft["p90"] == pytest.approx(0.3 + 0.8 * 1.7)  # rank 1.8
    assert ttft["p99"] == pytest.approx(0.3 + 0.98 * 1.7)  # rank 1.98
    assert ttft["mean"] == pytest.approx(0.8)
    assert summary["tpot_s"]["p50"] == pytest.approx(0.3)  # [0.1, 0.5]
    assert summary["tpot_s"]["p90"] == pytest.approx(0.46)
    itl = summary["itl_s"]  # [0.1 x4, 0.5 x2]
    assert itl["p50"] == pytest.approx(0.1) and itl["p90"] == pytest.approx(0.5)
    assert itl["mean"] == pytest.approx(1.4 / 6)
    assert summary["e2e_s"]["p50"] == pytest.approx(1.3)
    # Only "a" meets both SLOs; the failed request counts against attainment.
    assert summary["goodput_rps"] == pytest.approx(0.1)
    assert summary["slo_attainment"] == {"ttft": 0.5, "tpot": 0.5, "all": 0.25}
    assert summary["feedback"] == {"sent": 1, "ok": 1}
    assert summary["alignment"] == {
        "0": {"n": 2.0, "exact": 0.5, "prefix": 1.0},
        "1": {"n": 1.0, "exact": 1.0, "prefix": 1.0},  # the failed "d" is not scored
    }


def test_adapter_publishes_come_from_the_events() -> None:
    events = [{"kind": "adapter", "time_s": 0.1, "version": 0, "source": "poll", "initial": True},
              {"kind": "adapter", "time_s": 5.0, "version": 1, "source": "poll", "initial": False}]
    summary = summarize(RECORDS, events=events)
    assert summary["adapter_publishes"] == [{"time_s": 5.0, "version": 1}]
    assert summary["adapter_versions"] == []  # no answer reported a version


def test_summary_without_slo_or_records() -> None:
    summary = summarize(RECORDS)
    assert summary["goodput_rps"] is None and summary["slo_attainment"] == {"all": None}
    assert summary["duration_s"] == pytest.approx(4.0)  # first arrival 0.0, last end 2.0+2.0
    empty = summarize([])
    assert empty["requests"] == 0 and empty["throughput_rps"] == 0.0 and empty["ttft_s"]["p50"] is None
    assert run_duration([]) == 0.0


def test_answer_matching() -> None:
    assert exact_match("  Blue. ", "blue") and not exact_match("blue sky", "blue")
    assert exact_match("New-York", "new york")
    assert prefix_match("Blue, of course", "blue") and not prefix_match("bluest", "blue")
    assert not exact_match(None, "blue") and not prefix_match("", "blue")
    assert alignment([rec(reference=None, answer="x")]) == {}


def test_parse_slo() -> None:
    assert parse_slo("ttft=1.0,tpot=0.15") == {"ttft": 1.0, "tpot": 0.15}
    assert parse_slo(" e2e = 5 ") == {"e2e": 5.0}
    assert parse_slo("") == {} and parse_slo(None) == {}
    for bad in ("latency=1", "ttft", "ttft=0", "ttft=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_records_round_trip_through_dicts() -> None:
    record = RECORDS[0]
    data = record.to_dict()
    assert data["tpot_s"] == pytest.approx(0.1)
    assert RequestRecord.from_dict(data) == record


def test_recorder_keeps_adapter_versions_monotonic() -> None:
    recorder = Recorder()
    recorder.add(rec(status="ok", start_s=1.0, e2e_s=0.5, ttft_s=0.1, adapter_version=0))
    recorder.note_adapter(2, 3.0, "poll")
    recorder.add(rec(status="ok", start_s=2.5, e2e_s=1.0, ttft_s=0.1, adapter_version=1))  # started before v2
    assert recorder.adapter_version == 2
    assert [(e["version"], e["initial"]) for e in recorder.events] == [(0, True), (2, False)]
    assert recorder.counts() == (2, 0)
