"""Arrival processes, the spread of users over classes, and the workload cursor."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from loadgen.arrivals import arrival_times, between, constant, gamma_gaps, poisson_gaps
from loadgen.context import Workload
from loadgen.runner import assign, user_classes
from loadgen.traces import TraceItem
from loadgen.users import ChatUser, FeedbackUser, User, WsChatUser


def test_poisson_and_gamma_gaps_have_the_asked_statistics() -> None:
    poisson = list(itertools.islice(poisson_gaps(4.0, random.Random(0)), 20000))
    assert statistics.fmean(poisson) == pytest.approx(0.25, rel=0.05)
    bursty = list(itertools.islice(gamma_gaps(4.0, 5.0, random.Random(0)), 20000))
    mean = statistics.fmean(bursty)
    assert mean == pytest.approx(0.25, rel=0.1)
    assert statistics.pvariance(bursty) / mean**2 == pytest.approx(5.0, rel=0.2)  # CV² = burstiness
    # The same seed gives the same arrivals.
    again = list(itertools.islice(gamma_gaps(4.0, 5.0, random.Random(0)), 100))
    assert again == bursty[:100]
    times = list(itertools.islice(arrival_times(iter([1.0, 0.5, 2.0])), 3))
    assert times == [1.0, 1.5, 3.5]
    with pytest.raises(ValueError):
        next(gamma_gaps(0.0, 1.0, random.Random(0)))


def test_wait_times_bind_like_methods() -> None:
    class Sleepy:
        rng = random.Random(0)
        wait_time = between(1.0, 2.0)

    assert constant(0.5)(Sleepy()) == 0.5
    assert all(1.0 <= Sleepy().wait_time() <= 2.0 for _ in range(100))


def test_users_are_spread_by_weight() -> None:
    classes: list[tuple[type[User], float]] = [(ChatUser, 3.0), (WsChatUser, 1.0)]
    spread = assign(classes, 8)
    assert spread.count(ChatUser) == 6 and spread.count(WsChatUser) == 2
    assert spread[:4].count(WsChatUser) == 1  # interleaved: the first half has its share too
    assert assign(classes, 1) == [ChatUser]
    assert [cls for cls, _ in user_classes({"chat": 1, "feedback": 2, "ws": 0})] == [ChatUser, FeedbackUser]
    with pytest.raises(ValueError, match="unknown user kinds"):
        user_classes({"robot": 1})


def test_workload_cycles_until_its_limit() -> None:
    items = [TraceItem(id=str(i), time=float(i), messages=[{"role": "user", "content": "x"}]) for i in range(3)]
    workload = Workload(items, limit=5)
    claimed = [workload.claim() for _ in range(6)]
    assert [item.id if item else None for item in claimed] == ["0", "1", "2", "0", "1", None]
    once = Workload(items, cycle=False)
    assert [once.claim() is not None for _ in range(4)] == [True, True, True, False]
    assert Workload([]).claim() is None
