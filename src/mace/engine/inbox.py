"""The event loop's messages to the engine thread, and the queue that carries them.

The engine thread takes every waiting message between two steps (`EngineCore.handle`), so the
scheduler's and the trainer's state only ever change on that thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mace.engine.request import Request
from mace.tenancy import SHARED
from mace.train.lineage import LineageFiles


@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Ingest:
    """New feedback is in the journal: score it between steps."""


@dataclass(frozen=True)
class Activate:
    """Serve `tenant`'s `version` to its new requests; `reply` gets None, or the error, on the engine thread."""

    version: int
    reply: Callable[[BaseException | None], None]
    tenant: str = SHARED


@dataclass(frozen=True)
class InstallLineage:
    """A lineage read from the disk off the engine thread: make it resident before the requests behind it."""

    files: LineageFiles


EngineMessage = AddRequest | Abort | Ingest | Activate | InstallLineage


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[EngineMessage] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()

    def put(self, message: EngineMessage) -> None:
        self._queue.put(message)
        self._wakeup.set()

    def take_all(self) -> list[EngineMessage]:
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages

    def wait(self, timeout_s: float) -> None:
        """Sleep until a message (or a stop) arrives, at most `timeout_s`."""
        self._wakeup.wait(timeout=timeout_s)
        self._wakeup.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()
