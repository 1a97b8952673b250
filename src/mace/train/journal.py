"""The feedback journal: SQLite (WAL, synchronous=FULL) in the data dir.

A sample is acknowledged only after its transaction committed, so `kill -9` at any moment keeps
every acknowledged sample. A batch is one transaction: all of it is stored or none of it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL,
    request_id TEXT,
    tenant TEXT,
    weight REAL NOT NULL DEFAULT 1.0,
    held_out INTEGER NOT NULL DEFAULT 0,
    num_trained INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class NewSample:
    """`prompt` is the rendered prompt text (chat template applied), `completion` the wanted answer."""

    prompt: str
    completion: str
    request_id: str | None = None
    tenant: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class StoredSample:
    sample_id: int
    created_at: float
    prompt: str
    completion: str
    weight: float
    held_out: bool
    num_trained: int


@dataclass(frozen=True)
class JournalCounts:
    total: int
    pending: int
    trained: int
    held_out: int
    cursor: int


class Journal:
    def __init__(self, path: Path, heldout_every: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._heldout_every = heldout_every
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, samples: list[NewSample]) -> list[int]:
        """Store all samples durably in one transaction; returns their ids."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [self._insert(sample, now) for sample in samples]
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (a full disk); a second ROLLBACK would
                # raise and hide the real cause.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return ids

    def _insert(self, sample: NewSample, now: float) -> int:
        cursor = self._db.execute(
            "INSERT INTO samples (created_at, prompt, completion, request_id, tenant, weight) VALUES (?,?,?,?,?,?)",
            (now, sample.prompt, sample.completion, sample.request_id, sample.tenant, sample.weight),
        )
        sample_id = int(cursor.lastrowid or 0)
        if sample_id % self._heldout_every == 0:
            self._db.execute("UPDATE samples SET held_out = 1 WHERE id = ?", (sample_id,))
        return sample_id

    def since(self, after_id: int, limit: int = 1000) -> list[StoredSample]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created_at, prompt, completion, weight, held_out, num_trained FROM samples "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [StoredSample(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    def recent(self, limit: int) -> list[StoredSample]:
        with self._lock:
            last = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0]
        return self.since(max(0, last - limit), limit)

    def mark_trained(self, sample_ids: list[int], cursor: int) -> None:
        """Record trained samples and the training cursor (the highest sample id seen) together."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE samples SET num_trained = num_trained + 1 WHERE id = ?", [(i,) for i in sample_ids]
            )
            self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('cursor', ?)", (cursor,))
            self._db.execute("COMMIT")

    def cursor(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = 'cursor'").fetchone()
        return int(row[0]) if row else 0

    def counts(self) -> JournalCounts:
        with self._lock:
            total, trained, held_out = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(num_trained > 0), 0), COALESCE(SUM(held_out), 0) FROM samples"
            ).fetchone()
        return JournalCounts(
            total=total, pending=total - trained - held_out, trained=trained, held_out=held_out, cursor=self.cursor()
        )
