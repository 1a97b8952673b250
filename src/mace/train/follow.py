"""Followers: lineages another server owns on a shared data dir (train/lease.py), served here with
the versions their owner publishes.

Every `FOLLOW_S` the writer thread reads each followed lineage's catalog (versions and the active
marker), the weights of an active version this server does not serve yet, and whether the owner is
gone (its lease can be taken: it exited or evicted the lineage). The engine thread then applies
that at a step boundary (`Trainer.follow_store`): a new active version is installed and serves new
requests; a lineage whose owner is gone is dropped and read again, this time as its owner, which
trains the samples the journal holds for it and not trained yet.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mace.tenancy import tenant_dir
from mace.train.adapters import AdapterVersion, read_catalog
from mace.train.learner import read_adapter
from mace.train.lease import LineageLease
from mace.train.writer import DiskWriter

FOLLOW_S = 1.0  # how often followed lineages are read from the disk


@dataclass(frozen=True)
class FollowedState:
    tenant: str
    owner_gone: bool
    versions: list[AdapterVersion]
    active: int
    weights: dict[str, torch.Tensor] | None  # the active version's, when this server does not serve it yet


def read_followed(data_dir: Path, serving: dict[str, int]) -> list[FollowedState]:
    """Disk only (writer thread): each followed lineage (`serving`: tenant -> the version served here)."""
    states = []
    for tenant, served in serving.items():
        root = tenant_dir(data_dir, tenant)
        lease = LineageLease.try_take(root)
        if lease is not None:  # nobody owns it now; the engine thread reads it again to own it
            lease.release()
            states.append(FollowedState(tenant, True, [], served, None))
            continue
        versions, active = read_catalog(root / "adapters")
        weights = None
        if active not in (0, served):
            try:
                weights = read_adapter(root / "adapters" / f"v{active}")
            except OSError:  # the marker names a version the owner renamed into place: it is whole
                continue
        states.append(FollowedState(tenant, False, versions, active, weights))
    return states


class FollowerSync:
    """When to read followed lineages, and the read in flight."""

    def __init__(self, writer: DiskWriter, data_dir: Path, on_read: Callable[[], None]) -> None:
        self._writer = writer
        self._data_dir = data_dir
        self._on_read = on_read
        self._read: concurrent.futures.Future[list[FollowedState]] | None = None
        self._read_at_s = time.monotonic()

    def poll(self, serving: dict[str, int]) -> list[FollowedState]:
        """Engine thread: the states read since the last call (none while a read is on its way), and a
        new read every `FOLLOW_S` while anything is followed."""
        read = self._read
        if read is None:
            if serving and time.monotonic() - self._read_at_s >= FOLLOW_S:
                self._read_at_s = time.monotonic()
                self._read = self._writer.submit(lambda: read_followed(self._data_dir, serving))
                self._read.add_done_callback(lambda _: self._on_read())  # an idle engine wakes to apply it
            return []
        if not read.done():
            return []
        self._read = None
        return read.result()
