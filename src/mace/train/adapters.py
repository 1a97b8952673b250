"""Published adapter versions on disk: PEFT directories (safetensors + config) plus a meta.json.

A version is written to a staging directory and renamed into place, so a crash never leaves half a
version; the active version is a small file replaced atomically, and only once the version it names
is in place.

Writes run on the trainer's writer thread (train/writer.py), in order: a publish happens at a step
boundary on the engine thread, and disk I/O there would land in the interval the streams are waiting
on. The directory is read once, when the store opens; after that the versions are known from memory
(a version is listed from its `write` on, and dropped again if that write fails), so listing them
never reads the disk. `flush` waits for the writer.

A store opened `read_only` is a follower's (train/lease.py: another server owns the lineage): it
never writes, and `reload` takes the owner's versions and active version from the disk.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from mace.train.writer import DiskWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    created_at: float
    serving_loss: float | None  # held-out loss of the version it replaced, at publish time
    learner_loss: float | None  # held-out loss of this version at publish time
    num_optimizer_steps: int
    reason: str


def read_catalog(root: Path) -> tuple[list[AdapterVersion], int]:
    """A lineage's versions and active version from its directory, read only (any thread; a directory
    that does not exist is a lineage with no version yet)."""
    if not root.is_dir():
        return [], 0
    versions = sorted(_scan(root), key=lambda v: v.version)
    marker = root / "ACTIVE"
    active = int(marker.read_text()) if marker.is_file() else 0
    return versions, active if any(v.version == active for v in versions) else 0


def _scan(root: Path) -> list[AdapterVersion]:
    return [AdapterVersion(**json.loads(meta.read_text())) for meta in root.glob("v*/meta.json")]


class AdapterStore:
    def __init__(self, root: Path, writer: DiskWriter | None = None, read_only: bool = False) -> None:
        self.root = root
        self.read_only = read_only
        root.mkdir(parents=True, exist_ok=True)
        self._owns_writer = writer is None
        self._writer = writer if writer is not None else DiskWriter("mace-adapters")
        self._lock = threading.Lock()  # versions are listed from the event loop while the engine thread publishes
        self._versions = {v.version: v for v in _scan(root)}
        self._active: int | None = None  # the newest set_active, written or not

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[AdapterVersion]:
        with self._lock:
            return sorted(self._versions.values(), key=lambda v: v.version)

    def newest(self) -> int:
        """The highest version known (0: none published yet)."""
        with self._lock:
            return max(self._versions, default=0)

    def write(self, meta: AdapterVersion, save: Callable[[Path], None]) -> concurrent.futures.Future[None]:
        """Queue writing version `meta.version`; `save(dir)` writes the PEFT adapter files into dir.

        `save` runs on the writer thread, so it must only read data copied off the model.
        """
        if self.read_only:
            raise PermissionError(f"another server owns the lineage under {self.root.parent}")
        with self._lock:
            self._versions[meta.version] = meta
        return self._writer.submit(lambda: self._write(meta, save))

    def _write(self, meta: AdapterVersion, save: Callable[[Path], None]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            written = staging / f"v{meta.version}"
            save(written)
            (written / "meta.json").write_text(json.dumps(asdict(meta)))
            os.rename(written, self.path(meta.version))
        except Exception:
            # The version still serves from memory; it is just not on disk for a restart or a rollback.
            log.exception("adapter version not written", version=meta.version)
            with self._lock:
                self._versions.pop(meta.version, None)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def active(self) -> int:
        if self._active is not None:
            return self._active
        marker = self.root / "ACTIVE"
        return int(marker.read_text()) if marker.is_file() else 0

    def set_active(self, version: int) -> None:
        """Make `version` the one a restart serves, once every write queued before has landed (a
        read-only store: the one this server serves, until the owner's next `reload`)."""
        self._active = version
        if self.read_only:
            return
        self._writer.submit(lambda: self._write_active(version))

    def _write_active(self, version: int) -> None:
        if version != 0 and not (self.path(version) / "meta.json").is_file():
            log.error("active version not on disk; a restart keeps the previous one", version=version)
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".active-")
        with os.fdopen(fd, "w") as handle:
            handle.write(str(version))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / "ACTIVE")

    def reload(self, versions: list[AdapterVersion], active: int) -> None:
        """A read-only store takes what `read_catalog` read from the disk (the owner's writes)."""
        with self._lock:
            self._versions = {v.version: v for v in versions}
        self._active = active

    def exists(self, version: int) -> bool:
        with self._lock:
            return version == 0 or version in self._versions

    def flush(self) -> None:
        """Wait until every queued write has landed (or failed)."""
        self._writer.flush()

    def close(self) -> None:
        """Wait for queued writes (and stop the writer if the store started it)."""
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()

    @staticmethod
    def now() -> float:
        return time.time()
