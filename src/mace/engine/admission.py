"""What admission answers besides "yes": the refusals `AsyncEngine.admit` raises, and the ticket it
hands out, which holds one of the engine's places for generations until it is released."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType


class RequestRejected(ValueError):
    """The request can never be served as asked (HTTP 400): too long for the context, an unknown class."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Overloaded(RuntimeError):
    """Not now (HTTP 429): the engine is at capacity ("queue_full"), or the request is predicted to
    miss its TTFT target ("overloaded", counted per SLO class)."""

    def __init__(self, message: str, retry_after_s: int, code: str, slo_class: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code
        self.slo_class = slo_class


class ShuttingDown(RuntimeError):
    """Admission is closed for a graceful shutdown (HTTP 503)."""


class Admission:
    """An admitted request's ticket: its SLO class, and one place among the generations the engine
    counts. Release it once the generation is over, however it ended (`with admission:`)."""

    def __init__(self, slo_class: str, release: Callable[[], None]) -> None:
        self.slo_class = slo_class
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
