"""Per-key rate limits (token buckets) and concurrency caps, all on the event loop (no locks needed).

A bucket holds up to `burst` tokens and refills at `rate_per_s`; a request takes one token, a feedback
batch takes one per sample. When a bucket is short, the caller answers 429 with the seconds until it
would have enough (Retry-After), so a client that waits as told is admitted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mace.server.errors import ApiError


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated_s = clock()

    def take(self, cost: float = 1.0) -> float:
        """Take `cost` tokens and return 0, or take nothing and return the seconds until `cost` is there.

        A cost above the burst can never be paid at once; it is admitted from a full bucket (which then
        runs into debt) so that a large but legal feedback batch is slowed, not refused forever.
        """
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated_s) * self.rate_per_s)
        self._updated_s = now
        needed = min(cost, self.burst)
        if self._tokens >= needed:
            self._tokens -= cost
            return 0.0
        return (needed - self._tokens) / self.rate_per_s


class KeyLimiter:
    """One bucket per key name, created on first use with that key's rate."""

    def __init__(self, kind: str, burst: int) -> None:
        self.kind = kind
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key_name: str, per_minute: float, cost: float = 1.0) -> None:
        if per_minute <= 0:
            return
        bucket = self._buckets.get(key_name)
        if bucket is None or bucket.rate_per_s != per_minute / 60:
            bucket = self._buckets[key_name] = TokenBucket(per_minute / 60, self.burst)
        wait_s = bucket.take(cost)
        if wait_s > 0:
            raise ApiError(429, f"rate limit for {self.kind} exceeded ({per_minute:g} per minute); "
                           f"retry in {wait_s:.1f}s", code="rate_limit_exceeded", retry_after_s=math.ceil(wait_s))


class ConcurrencyCap:
    """At most `limit` holders per key at once (generations a key runs, feedback writes in flight)."""

    def __init__(self, limit: int, what: str, holder: str = "this key", code: str = "too_many_streams") -> None:
        self.limit = limit
        self.what = what
        self.holder = holder
        self.code = code
        self._held: dict[str, int] = {}

    def acquire(self, key_name: str) -> None:
        held = self._held.get(key_name, 0)
        if held >= self.limit:
            raise ApiError(429, f"{self.holder} already has {held} {self.what} running; the limit is {self.limit}",
                           code=self.code, retry_after_s=1)
        self._held[key_name] = held + 1

    def release(self, key_name: str) -> None:
        held = self._held.get(key_name, 0) - 1
        if held > 0:
            self._held[key_name] = held
        else:
            self._held.pop(key_name, None)

    @contextmanager
    def hold(self, key_name: str) -> Iterator[None]:
        self.acquire(key_name)
        try:
            yield
        finally:
            self.release(key_name)

    def count(self, key_name: str) -> int:
        return self._held.get(key_name, 0)
