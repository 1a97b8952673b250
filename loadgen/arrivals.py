"""Arrival processes (open loop) and wait times (closed loop), all driven by a seeded RNG.

poisson: exponential gaps of mean 1/rate.
bursty: gamma gaps of mean 1/rate with shape 1/burstiness, so the squared coefficient of variation
    of the gaps equals `burstiness`: 1 is Poisson, larger values bunch requests into bursts
    separated by lulls (the usual way serving benchmarks model burstiness).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

# As in locust, a wait time is a function of the user (a class attribute, so it binds like a method);
# it draws from the user's own `rng`.
WaitTime = Callable[[Any], float]


def constant(seconds: float) -> WaitTime:
    """A closed-loop user waits exactly `seconds` between tasks (locust's `constant`)."""
    return lambda user: seconds


def between(low: float, high: float) -> WaitTime:
    """A uniform wait in [low, high] (locust's `between`)."""
    return lambda user: float(user.rng.uniform(low, high))


def poisson_gaps(rate: float, rng: random.Random) -> Iterator[float]:
    if rate <= 0:
        raise ValueError("the rate must be positive")
    while True:
        yield rng.expovariate(rate)


def gamma_gaps(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the rate and the burstiness must be positive")
    shape = 1.0 / burstiness
    scale = 1.0 / (rate * shape)  # mean = shape * scale = 1 / rate
    while True:
        yield rng.gammavariate(shape, scale)


def arrival_times(gaps: Iterator[float]) -> Iterator[float]:
    """Cumulative sums of the gaps: the arrival times from 0."""
    now = 0.0
    for gap in gaps:
        now += gap
        yield now
