"""The trainer's disk writes, in order, on one thread off the engine thread.

Journal commits (trained counts, losses, the cursor), adapter versions and learner checkpoints all
go through one writer: a step boundary on the engine thread lands in the interval the streams are
waiting on, and a fsync there would be a visible stall. One thread keeps them in submission order
(a version's files land before the `ACTIVE` marker that names it). The queue is bounded, so a disk
that cannot keep up slows the trainer instead of growing memory without limit.

What is submitted must only read data copied off the model (a CPU copy), never live tensors.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

MAX_QUEUED = 64

T = TypeVar("T")
_Job = tuple[Callable[[], Any], concurrent.futures.Future[Any]]


class DiskWriter:
    def __init__(self, name: str = "mace-writer", max_queued: int = MAX_QUEUED) -> None:
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, write: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `write`; blocks while the queue is full. The future holds its outcome (a read queued
        here sees every write queued before it: how a lineage comes back after its eviction's save)."""
        if self._closed:
            raise RuntimeError("the disk writer is closed")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((write, done))
        return done

    def flush(self) -> None:
        """Wait until every write queued before has landed (or failed)."""
        self.submit(lambda: None).result()

    def close(self) -> None:
        """Finish every queued write, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            write, done = job
            try:
                result = write()
            except Exception as exc:  # one failed write never stops the ones after it
                log.exception("disk write failed")
                done.set_exception(exc)
            else:
                done.set_result(result)
