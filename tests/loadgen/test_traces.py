"""Built-in drift traces: determinism, the drift itself, and the JSONL format."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from loadgen.moderation import ALWAYS, policies
from loadgen.personalization import VALUES, profiles
from loadgen.traces import DriftSpec, TraceItem, builtin, dumps, load, phase_starts, read, write

SPEC = DriftSpec(seed=7, phases=3, phase_s=30.0, rate=3.0)


@pytest.mark.parametrize("name", ["personalization", "moderation"])
def test_same_seed_same_trace_other_seed_other_trace(name: str) -> None:
    first = dumps(builtin(name, SPEC))
    assert first == dumps(builtin(name, SPEC))
    assert first != dumps(builtin(name, DriftSpec(seed=8, phases=3, phase_s=30.0, rate=3.0)))


@pytest.mark.parametrize("name", ["personalization", "moderation"])
def test_trace_shape(name: str) -> None:
    items = builtin(name, SPEC)
    assert 150 < len(items) < 400  # ~3 req/s for 90 s
    times = [item.time for item in items]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 90.0
    assert [item.phase for item in items] == [int(t // 30.0) for t in times]
    assert all(item.reference and item.max_tokens == SPEC.max_tokens for item in items)
    with_feedback = [item for item in items if item.feedback]
    assert 0.3 < len(with_feedback) / len(items) < 0.7  # feedback_fraction 0.5
    for item in with_feedback:
        assert item.feedback is not None
        (sample,) = item.feedback
        assert sample["messages"][:-1] == item.messages
        assert sample["messages"][-1] == {"role": "assistant", "content": item.reference}


def test_personalization_facts_change_at_every_boundary() -> None:
    history = profiles(random.Random(0), users=8, phases=4)
    for before, after in itertools.pairwise(history):
        for name in before:
            changed = [a for a in VALUES if before[name][a] != after[name][a]]
            assert 1 <= len(changed) <= 2
    # Within a phase, the same user's same question always has the same reference answer.
    answers: dict[tuple[int, str | None, str], str | None] = {}
    for item in builtin("personalization", SPEC):
        key = (item.phase, item.user, item.messages[-1]["content"])
        assert answers.setdefault(key, item.reference) == item.reference


def test_personalization_with_user_tenants_is_the_same_trace_with_each_user_its_own_tenant() -> None:
    shared = builtin("personalization", SPEC)
    per_user = builtin("personalization", DriftSpec(seed=7, phases=3, phase_s=30.0, rate=3.0, user_tenants=True))
    assert all(item.tenant is None for item in shared)
    assert [item.tenant for item in per_user] == [item.user for item in shared]
    assert [(i.messages, i.reference, i.feedback) for i in per_user] == [(i.messages, i.reference, i.feedback)
                                                                        for i in shared]

def test_moderation_policy_flips_between_phases() -> None:
    history = policies(random.Random(0), phases=5)
    for before, after in itertools.pairwise(history):
        assert before != after
        for category, label in ALWAYS.items():
            assert before[category] == after[category] == label
    items = builtin("moderation", SPEC)
    assert {item.reference for item in items} == {"allow", "block"}
    assert all(item.reference == "block" for item in items if item.user == "spam")


def test_jsonl_round_trip_and_loading(tmp_path: Path) -> None:
    items = builtin("moderation", SPEC)[:20]
    path = tmp_path / "trace.jsonl"
    write(path, items)
    assert read(path) == items
    assert load(str(path), SPEC) == items
    # A hand-written trace: minimal lines, out of order, a single feedback object.
    path.write_text(
        '{"time": 2.0, "messages": [{"role": "user", "content": "b"}]}\n\n'
        '{"time": 1.0, "messages": [{"role": "user", "content": "a"}], "max_tokens": 4,'
        ' "feedback": {"prompt": "a", "completion": "x"}}\n'
    )
    loaded = read(path)
    assert [item.messages[0]["content"] for item in loaded] == ["a", "b"]
    assert loaded[0].feedback == [{"prompt": "a", "completion": "x"}] and loaded[0].max_tokens == 4
    assert loaded[1].id == "t0" and loaded[1].phase == 0 and loaded[1].reference is None
    assert phase_starts(items) == {0: items[0].time}


def test_bad_trace_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace"):
        load("nonsense", SPEC)
    with pytest.raises(ValueError, match="messages"):
        TraceItem.from_dict({"time": 0.0, "messages": []})
