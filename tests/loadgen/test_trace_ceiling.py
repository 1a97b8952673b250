"""benchmarks/trace_ceiling.py: the trace's ceiling, and how much of it a run's answers reached."""

from __future__ import annotations

from loadgen.traces import DriftSpec, builtin

from tests.conftest import benchmark_module


def test_a_run_that_answers_every_taught_question_reaches_the_ceiling_and_a_wrong_users_answer_is_counted() -> None:
    trace_ceiling = benchmark_module("trace_ceiling")
    items = builtin("personalization", DriftSpec(seed=0, rate=1.0))
    ceiling = trace_ceiling.ceilings(items, heldout_every=5)
    right = trace_ceiling.ceilings(items, 5, answers={item.id: f"{item.reference}." for item in items})
    nobody = trace_ceiling.ceilings(items, 5, answers={})
    for phase, counts in ceiling.items():
        assert counts["question taught"] > 0
        assert right[phase]["taught, answered"] == right[phase]["taught, right"] == counts["question taught"]
        assert nobody[phase]["taught, answered"] == 0
    # One user's answer given to another user whose value differs: counted as another user's value.
    by_fact = {(item.user, item.messages[-1]["content"], item.phase): item.reference for item in items}
    swapped = {}
    for item in items:
        others = [value for (user, question, phase), value in by_fact.items()
                  if question == item.messages[-1]["content"] and user != item.user and value != item.reference]
        swapped[item.id] = others[0] if others else "nothing"
    wrong = trace_ceiling.ceilings(items, 5, answers=swapped)
    assert sum(counts["taught, right"] for counts in wrong.values()) == 0
    assert sum(counts["taught, another user"] for counts in wrong.values()) > 0


def test_an_answer_with_the_users_own_earlier_value_is_counted_as_such() -> None:
    trace_ceiling = benchmark_module("trace_ceiling")
    items = builtin("personalization", DriftSpec(seed=0, rate=1.0))
    earlier: dict[tuple[str | None, str], str] = {}
    stale = {}
    for item in sorted(items, key=lambda item: item.phase):
        fact = trace_ceiling.fact_key(item, item.messages)
        if fact in earlier and earlier[fact] != item.reference:
            stale[item.id] = earlier[fact]  # the value this user had before changing it
        elif item.phase == 0:
            earlier[fact] = item.reference
    counts = trace_ceiling.ceilings(items, 5, answers=stale)
    assert sum(phase["taught, answered"] for phase in counts.values()) > 0
    assert sum(phase["taught, own earlier value"] for phase in counts.values()) > 0
    assert sum(phase["taught, right"] for phase in counts.values()) == 0
