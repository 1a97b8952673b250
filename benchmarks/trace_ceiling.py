"""What a drifting trace lets a server answer at best: the exact-match ceiling of `make bench-train`.

A question can only be answered right by learning if its answer was taught before it was asked, in a
sample the server trains on: some samples are held out for the publish gate and never trained. Which
ones the server's own journal decides here (train/journal.py: per fact, only repeats of an answer
already taught, at most one in `train.heldout_every` of a tenant's), from the trace's feedback in
arrival order. Per phase this prints the share of
questions whose very question was taught with the reference answer before (what a server that learns
each taught sample at once, and nothing more, answers), and, for the personalization trace, the share
whose fact (the user's attribute, under either of its two phrasings) was. No server; prints only.

`--requests DIR/mace/requests.jsonl` (a `loadgen compare` run of the same trace) also says how much of
that ceiling the run reached: per phase, the questions answered exactly among those whose very
question was taught before, and how many of its wrong answers were another user's value for the same
attribute (an answer learned, but bound to the wrong user).

    .venv/bin/python benchmarks/trace_ceiling.py [--trace personalization] [--trace-rate 1.0] [--seed 0]
        [--requests PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from loadgen.metrics import exact_match
from loadgen.personalization import QUESTIONS
from loadgen.traces import DriftSpec, TraceItem, builtin, question_key

from mace.config import TrainConfig
from mace.train.journal import Journal, NewSample

ATTRIBUTE_OF = {question: attribute for attribute, questions in QUESTIONS.items() for question in questions}


def fact_key(item: TraceItem, messages: list[dict[str, str]]) -> tuple[str | None, str] | None:
    """(user, attribute) of a personalization question; None for other traces."""
    attribute = ATTRIBUTE_OF.get(messages[-1]["content"])
    return (item.user, attribute) if attribute is not None else None


def ceilings(items: list[TraceItem], heldout_every: int,
             answers: dict[str, str] | None = None) -> dict[int, Counter[str]]:
    """Per phase: questions asked, whose question / fact was taught before; with `answers` (the run's
    answer by trace id), how many taught questions it answered right, and its wrong answers that are
    another user's value of the same fact."""
    with tempfile.TemporaryDirectory() as scratch:
        journal = Journal(Path(scratch) / "journal.sqlite3", heldout_every)
        try:
            return _ceilings(items, journal, answers)
        finally:
            journal.close()


def _ceilings(items: list[TraceItem], journal: Journal, answers: dict[str, str] | None) -> dict[int, Counter[str]]:
    taught_answers: dict[str, str] = {}
    taught_facts: dict[tuple[str | None, str], str] = {}
    earlier_values: dict[tuple[str | None, str], set[str]] = {}  # values a user taught, then changed
    by_phase: dict[int, Counter[str]] = {}
    for item in sorted(items, key=lambda item: item.time):
        counts = by_phase.setdefault(item.phase, Counter())
        counts["asked"] += 1
        fact = fact_key(item, item.messages)
        if item.reference is not None and taught_answers.get(question_key(item.messages)) == item.reference:
            counts["question taught"] += 1
            if answers is not None and item.id in answers:
                answer = answers[item.id]
                counts["taught, answered"] += 1
                if exact_match(answer, item.reference):
                    counts["taught, right"] += 1
                elif fact is not None and any(exact_match(answer, value) for value in earlier_values.get(fact, ())):
                    counts["taught, own earlier value"] += 1
                elif fact is not None and any(exact_match(answer, value) for (user, attribute), value
                                              in taught_facts.items() if attribute == fact[1] and user != item.user):
                    counts["taught, another user"] += 1
        if fact is not None and taught_facts.get(fact) == item.reference:
            counts["fact taught"] += 1
        for sample in item.feedback or []:
            *question, answer = sample["messages"]
            [sample_id] = journal.append([NewSample(question_key(question), answer["content"], tenant=item.tenant)])
            if journal.since(sample_id - 1, limit=1)[0].held_out:
                continue  # held out: the gate judges on it, training never sees it
            taught_answers[question_key(question)] = answer["content"]
            taught_fact = fact_key(item, question)
            if taught_fact is not None:
                if taught_facts.get(taught_fact, answer["content"]) != answer["content"]:
                    earlier_values.setdefault(taught_fact, set()).add(taught_facts[taught_fact])
                taught_facts[taught_fact] = answer["content"]
    return by_phase


def run_answers(path: str) -> dict[str, str]:
    """A compare run's chat answers by trace id (requests.jsonl), the ones that finished."""
    with open(path) as records:
        rows = [json.loads(line) for line in records if line.strip()]
    return {row["trace_id"]: row["answer"] or "" for row in rows
            if row.get("kind") == "chat" and row.get("trace_id") and row.get("status") == "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default="personalization")
    parser.add_argument("--trace-rate", type=float, default=1.0, help="as `make bench-train` replays it")
    parser.add_argument("--trace-feedback", type=float, default=DriftSpec.feedback_fraction)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-every", type=int, default=TrainConfig().heldout_every)
    parser.add_argument("--requests", help="a compare run's requests.jsonl: how much of the ceiling it reached")
    args = parser.parse_args()
    spec = DriftSpec(seed=args.seed, rate=args.trace_rate, feedback_fraction=args.trace_feedback)
    answers = run_answers(args.requests) if args.requests else None
    by_phase = ceilings(builtin(args.trace, spec), args.heldout_every, answers)
    print(f"trace {args.trace}, seed {args.seed}, rate {args.trace_rate}/s, "
          f"held out per fact, at most one in {args.heldout_every} samples")
    print("| phase | questions | its question taught before | its fact taught before (either phrasing) |")
    print("|---|---|---|---|")
    for phase, counts in sorted(by_phase.items()):
        asked = counts["asked"]
        print(f"| {phase} | {asked} | {counts['question taught'] / asked:.1%} | {counts['fact taught'] / asked:.1%} |")
    if answers is None:
        return
    print(f"\nthe run {args.requests}, on the questions whose very question was taught before:")
    print("| phase | answered | right | wrong, the user's own earlier value "
          "| wrong, another user's value of the same fact |")
    print("|---|---|---|---|---|")
    for phase, counts in sorted(by_phase.items()):
        print(f"| {phase} | {counts['taught, answered']} | {counts['taught, right']} | "
              f"{counts['taught, own earlier value']} | {counts['taught, another user']} |")


if __name__ == "__main__":
    main()
