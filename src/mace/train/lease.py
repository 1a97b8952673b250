"""Which server trains a lineage when several share one data dir (replicas on one adapter store).

A lineage has one writer: the process holding the exclusive `flock` on its `OWNER` file. The kernel
drops the lock when the holder exits, however it exits (kill -9 included), so the next server that
asks takes the lineage over with no stale lock to clean up. The others serve the lineage as
followers: they read its published versions and never write them (train/trainer.py, `follow`).

`flock` holds across hosts only on a file system that implements it (local disks, NFSv4, CephFS,
GPFS, Lustre with `flock` mounted); docs/architecture.md says what a cluster's store must offer.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

OWNER_FILE = "OWNER"


class LineageLease:
    """The exclusive right to train one lineage and to write its versions and checkpoints."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def try_take(cls, directory: Path) -> LineageLease | None:
        """The lease on the lineage under `directory`, or None while another process holds it (disk:
        call it off the engine thread)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / OWNER_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for an operator reading the store; the lock, not this text, is the lease.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @property
    def is_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lineage up (closing the file drops the lock); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def holder(directory: Path) -> str:
    """What the current holder wrote into the lineage's OWNER file ('' if none)."""
    try:
        return (directory / OWNER_FILE).read_text().strip()
    except OSError:
        return ""


class OwnedElsewhere(RuntimeError):
    """A change only a lineage's owner may make (activating a version) asked of a follower."""
