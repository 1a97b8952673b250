"""The trace format (JSONL, one request a line) and the built-in drift traces.

A line: {"id", "time" (seconds from the start), "messages", "max_tokens", "phase", "reference"
(the expected answer, or null), "user" (who asks, or null), "feedback" (samples for POST /v1/feedback,
or null)}, and in multi-tenant traces "tenant" (sent as OpenAI's `user` field with the request; its
feedback samples carry it too) and "other_answers" (other tenants' answers to the same question: an
answer naming one of them instead of the reference is a cross-tenant leak); lines without a tenant
leave those two out. Built-in traces are generated offline from templates with a seed, so the same
name and seed give the same trace byte for byte (see `personalization`, `moderation` and `tenants`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class TraceItem:
    id: str
    time: float
    messages: Messages
    max_tokens: int = 16
    phase: int = 0
    reference: str | None = None
    user: str | None = None
    feedback: list[dict[str, Any]] | None = field(default=None)
    tenant: str | None = None  # sent as OpenAI's `user`: the adapter lineage that serves and learns it
    other_answers: list[str] | None = None  # other tenants' answers to this question (leak detection)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "time": self.time,
            "phase": self.phase,
            "user": self.user,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "reference": self.reference,
            "feedback": self.feedback,
        }
        if self.tenant is not None:  # single-tenant traces keep their lines as they were
            data["tenant"] = self.tenant
            data["other_answers"] = self.other_answers
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], index: int = 0) -> TraceItem:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"trace item {index}: `messages` must be a non-empty list")
        feedback = data.get("feedback")
        if isinstance(feedback, dict):
            feedback = [feedback]
        return cls(
            id=str(data.get("id", f"t{index}")),
            time=float(data.get("time", 0.0)),
            messages=messages,
            max_tokens=int(data.get("max_tokens", 16)),
            phase=int(data.get("phase", 0)),
            reference=data.get("reference"),
            user=data.get("user"),
            feedback=feedback,
            tenant=data.get("tenant"),
            other_answers=data.get("other_answers"),
        )


def dumps(items: Iterable[TraceItem]) -> bytes:
    return b"".join(orjson.dumps(item.to_dict(), option=orjson.OPT_SORT_KEYS) + b"\n" for item in items)


def write(path: str | Path, items: Iterable[TraceItem]) -> None:
    Path(path).write_bytes(dumps(items))


def read(path: str | Path) -> list[TraceItem]:
    items = []
    for number, line in enumerate(Path(path).read_bytes().splitlines()):
        if line.strip():
            items.append(TraceItem.from_dict(orjson.loads(line), number))
    # Replay needs arrival order; a stable sort keeps the file's order among equal times.
    return sorted(items, key=lambda item: item.time)


@dataclass(frozen=True)
class DriftSpec:
    """The shape shared by the built-in traces: `phases` phases of `phase_s` seconds each, requests
    arriving as a Poisson process of `rate` per second, feedback attached to `feedback_fraction`
    of them."""

    seed: int = 0
    phases: int = 3
    phase_s: float = 60.0
    rate: float = 2.0
    feedback_fraction: float = 0.5
    max_tokens: int = 8
    tenants: int = 16  # the tenants trace: how many tenants teach and ask about their own facts
    chatters: int = 8  # the tenants trace: users who only chat (no tenant, no feedback)
    user_tenants: bool = False  # the personalization trace: each user is its own tenant (OpenAI's `user`)

    def arrivals(self, rng: random.Random) -> list[float]:
        times: list[float] = []
        now, end = 0.0, self.phases * self.phase_s
        while True:
            now += rng.expovariate(self.rate)
            if now >= end:
                return times
            times.append(round(now, 4))

    def phase_of(self, time: float) -> int:
        return min(int(time // self.phase_s), self.phases - 1)


def builtin(name: str, spec: DriftSpec) -> list[TraceItem]:
    # Imported here: the generators import this module for TraceItem and DriftSpec.
    from loadgen.moderation import moderation
    from loadgen.personalization import personalization
    from loadgen.tenants import tenants

    generators = {"personalization": personalization, "moderation": moderation, "tenants": tenants}
    if name not in generators:
        raise ValueError(f"unknown trace {name!r}: one of {', '.join(generators)} or a JSONL path")
    return generators[name](spec)


def load(name_or_path: str, spec: DriftSpec) -> list[TraceItem]:
    """A built-in trace by name, or a JSONL file."""
    if Path(name_or_path).suffix == ".jsonl" or Path(name_or_path).exists():
        return read(name_or_path)
    return builtin(name_or_path, spec)


def sample(question: Messages, answer: str, request_id: str | None = None,
           user: str | None = None) -> dict[str, Any]:
    """A feedback sample: the question and the answer the user wanted (for `user`'s tenant, if given)."""
    body: dict[str, Any] = {"messages": [*question, {"role": "assistant", "content": answer}]}
    if request_id is not None:
        body["request_id"] = request_id
    if user is not None:
        body["user"] = user
    return body


def question_key(messages: Messages) -> str:
    """The same question, asked again or taught, always gives the same key."""
    return orjson.dumps(messages, option=orjson.OPT_SORT_KEYS).decode()


def phase_starts(items: Iterable[TraceItem]) -> dict[int, float]:
    """The first arrival time of each phase: where the plots draw phase boundaries."""
    starts: dict[int, float] = {}
    for item in items:
        starts[item.phase] = min(starts.get(item.phase, item.time), item.time)
    return dict(sorted(starts.items()))
