"""The feedback journal: SQLite (WAL, synchronous=FULL) in the data dir.

A sample is acknowledged only after its transaction committed, so `kill -9` at any moment keeps
every acknowledged sample. A batch is one transaction: all of it is stored or none of it.

Which samples are held out for the publish gate is chosen when a sample is stored, and stored with it,
so that every start, with training on or off, counts the same slice. The choice is per fact, not per
sample: a sample is held out only when it repeats the answer its lineage is already taught for the same
prompt (the newest training sample of that tenant and prompt has the same completion), and at most one
sample in `heldout_every` of a tenant's. A correction sent once is therefore always trained: holding out
every Nth sample by id left a fifth of the facts users taught once never learned, and on the tenants
trace one tenant with only one of its four facts trainable.

The trainer's own records (trained counts, last losses, the cursor) go through a second connection
with `synchronous=NORMAL`, written from the trainer's writer thread: they can be derived again (a
sample whose mark is lost is trained once more after a crash), so they take neither a fsync per
micro-step nor the lock the feedback path's writes wait on.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    num_trained INTEGER NOT NULL DEFAULT 0,
    loss REAL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS samples_by_tenant ON samples (tenant, held_out, id);
CREATE INDEX IF NOT EXISTS samples_by_prompt ON samples (prompt, held_out, id);
"""
# Columns added after the first release; a journal written by an older mace gains them at open.
LATER_COLUMNS = {"loss": "REAL"}
COLUMNS = "id, created_at, prompt, completion, weight, held_out, num_trained, loss, tenant"


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
    loss: float | None  # its loss when it was last trained: a restart ranks it without scoring it again
    tenant: str = ""  # who taught it (mace/tenancy.py; "": the shared lineage)


@dataclass(frozen=True)
class JournalCounts:
    total: int
    pending: int
    trained: int
    held_out: int
    cursor: int


class Journal:
    def __init__(self, path: Path, heldout_every: int) -> None:
        """At most one sample in `heldout_every` of a tenant's goes to the held-out slice (module doc)."""
        if heldout_every < 2:
            raise ValueError("heldout_every must be at least 2: every sample held out would train nothing")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.heldout_every = heldout_every
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(samples)")}
        for name, kind in LATER_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE samples ADD COLUMN {name} {kind}")
        self._marks_lock = threading.Lock()
        self._marks_db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._marks_db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._marks_lock:
            self._marks_db.close()
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
        if self._holds_out(sample, sample_id):
            self._db.execute("UPDATE samples SET held_out = 1 WHERE id = ?", (sample_id,))
        return sample_id

    def _holds_out(self, sample: NewSample, sample_id: int) -> bool:
        """Whether `sample` (just inserted, inside the caller's transaction) is held out: a repeat of
        the answer its lineage is taught for its prompt, once the tenant's credit allows. Each sample
        earns a tenant one credit, up to `heldout_every`; a held-out sample spends them all. The
        credit is stored in the same transaction, so a restart continues the same count."""
        key = f"held_out_credit:{sample.tenant or ''}"
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        credit = min((int(row[0]) if row else 0) + 1, self.heldout_every)
        taught = self._db.execute(
            "SELECT completion FROM samples WHERE prompt = ? AND held_out = 0 AND COALESCE(tenant, '') = ? "
            "AND id < ? ORDER BY id DESC LIMIT 1", (sample.prompt, sample.tenant or "", sample_id)).fetchone()
        held_out = credit >= self.heldout_every and taught is not None and taught[0] == sample.completion
        self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, 0 if held_out else credit))
        return held_out

    def since(self, after_id: int, limit: int = 1000) -> list[StoredSample]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM samples WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [_stored(row) for row in rows]

    def window(self, num_training: int, num_held_out: int, tenant: str | None = None) -> list[StoredSample]:
        """The newest `num_training` training samples and `num_held_out` held-out ones, oldest first:
        what a trainer that never stopped would hold now (older samples have left its windows).
        `tenant`: that tenant's samples only ("": those without a tenant); None: everyone's."""
        args: tuple[str, ...] = ()
        if tenant is None:
            where = "held_out = ?"
        elif tenant == "":  # journals from before tenants hold NULL
            where = "(tenant = '' OR tenant IS NULL) AND held_out = ?"
        else:
            where, args = "tenant = ? AND held_out = ?", (tenant,)
        query = f"SELECT {COLUMNS} FROM samples WHERE {where} ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = [*self._db.execute(query, (*args, 0, num_training)),
                    *self._db.execute(query, (*args, 1, num_held_out))]
        return sorted((_stored(row) for row in rows), key=lambda sample: sample.sample_id)

    def tenants_with_pending(self, limit: int) -> list[tuple[str, int]]:
        """Tenants with samples never trained (not held out) and the newest such sample's id, the most
        recently taught first: those a restart resumes at once."""
        with self._lock:
            rows = self._db.execute(
                "SELECT COALESCE(tenant, ''), MAX(id) AS newest FROM samples WHERE num_trained = 0 AND held_out = 0 "
                "GROUP BY COALESCE(tenant, '') ORDER BY newest DESC LIMIT ?", (limit,)).fetchall()
        return [(str(row[0]), int(row[1])) for row in rows]

    def last_id(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0])

    def mark_trained(self, sample_ids: list[int], cursor: int, losses: list[float]) -> None:
        """Record trained samples (and their latest losses) and the training cursor (the highest sample
        id seen) together, on the trainer's connection."""
        with self._marks_lock:
            self._marks_db.execute("BEGIN IMMEDIATE")
            try:
                self._marks_db.executemany(
                    "UPDATE samples SET num_trained = num_trained + 1, loss = COALESCE(?, loss) WHERE id = ?",
                    [(_finite_or_none(loss), i) for i, loss in zip(sample_ids, losses, strict=True)],
                )
                self._marks_db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('cursor', ?)", (cursor,))
                self._marks_db.execute("COMMIT")
            except BaseException:
                if self._marks_db.in_transaction:
                    self._marks_db.execute("ROLLBACK")
                raise

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


def _stored(row: tuple[Any, ...]) -> StoredSample:
    return StoredSample(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7], row[8] or "")


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
