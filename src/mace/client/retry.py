"""When the SDK retries: only when the server said it is safe, by answering 429 or 503 with Retry-After.

mace answers those before it acts (a rate limit, a full queue, a journal that cannot write: its
transaction is rolled back), so repeating the call cannot store a feedback sample twice. A dropped
connection or a timeout is never retried: the server may have stored what it was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mace.client.errors import RateLimitError, ServiceUnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `max_retries` repeats, each after the Retry-After the server asked for; a wait longer than
    `max_wait_s` (a journal that is down for a while says 30 s) is left to the caller: the error is raised
    at once, with its `retry_after_s`."""

    max_retries: int = 2
    max_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.max_wait_s < 0:
            raise ValueError("max_retries and max_retry_wait_s must not be negative")

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except (RateLimitError, ServiceUnavailableError) as exc:
                wait_s = exc.retry_after_s
                if attempt >= self.max_retries or wait_s is None or wait_s > self.max_wait_s:
                    raise
            attempt += 1
            await asyncio.sleep(wait_s)
