"""The trainer's disk writes leave the engine thread: one writer, in order, bounded; the journal's
trained marks never wait on the lock the feedback path's durable writes take."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mace.train.journal import Journal, NewSample
from mace.train.writer import DiskWriter


def test_writes_land_in_order_and_a_failed_one_does_not_stop_the_rest() -> None:
    writer = DiskWriter(max_queued=2)
    landed: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    futures = [writer.submit(lambda: landed.append(1)), writer.submit(fail), writer.submit(lambda: landed.append(2))]
    writer.flush()
    assert landed == [1, 2]
    with pytest.raises(OSError):
        futures[1].result()
    writer.submit(lambda: landed.append(3))
    writer.close()  # drains what is queued
    assert landed == [1, 2, 3]


def test_trained_marks_do_not_wait_for_the_feedback_paths_lock(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3", 5)
    [sample_id] = journal.append([NewSample("p", "c")])
    journal._lock.acquire()  # a feedback write stalled on the disk
    try:
        marked = threading.Thread(target=journal.mark_trained, args=([sample_id], sample_id, [0.5]))
        marked.start()
        marked.join(10)
        assert not marked.is_alive()
    finally:
        journal._lock.release()
    assert journal.counts().trained == 1 and journal.cursor() == sample_id
    journal.close()
