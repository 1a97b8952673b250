"""Which lineages are in memory (train/trainer.py): reading one back off the engine thread and
installing it at a step boundary, evicting idle ones past `train.max_resident_tenants`, bringing back
tenants with samples never trained, and, on a data dir shared with other servers, following the
lineages another server owns (train/lease.py, train/follow.py) and taking them over when it is gone.

`Residency` is a part of `Trainer`, split out for its size: it reads the trainer's state, declared
below, and calls the trainer's scoring (`_score`, `ingest`) and statistics (`_tenant_stats`).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from mace.config import MaceConfig, TrainConfig
from mace.tenancy import SHARED
from mace.train.follow import FOLLOW_S, FollowerSync
from mace.train.intake import NewTrainSample, SampleReader
from mace.train.journal import Journal
from mace.train.learner import AdapterKey, Learner
from mace.train.lease import holder
from mace.train.lineage import Lineage, LineageFiles, journal_filter, lineage_of, read_lineage
from mace.train.publish_gate import GateShare
from mace.train.rehearsal import AnchorStore, anchor_index
from mace.train.replay import TrainSample
from mace.train.scope import PromptStatistics, Scope
from mace.train.writer import DiskWriter

if TYPE_CHECKING:
    from mace.train.stats import TenantStats

log = structlog.get_logger(__name__)

MIN_IDLE_S = 2.0  # a lineage used more recently is not evicted (`_evict`)
PENDING_SCAN_S = 5.0  # how often the journal is asked for tenants on disk with samples never trained


class Residency:
    # The trainer's state this part reads and changes (set in `Trainer.__init__`).
    mace_config: MaceConfig
    config: TrainConfig
    journal: Journal
    learner: Learner
    anchors: AnchorStore
    anchor_words: list[frozenset[str]]
    prompt_statistics: PromptStatistics
    writer: DiskWriter
    reader: SampleReader
    lineages: dict[str, Lineage]
    gate_share: GateShare
    focus: Lineage
    on_lineage_read: Callable[[], None]
    _tenants_seen: set[str]
    _lock: threading.Lock
    _loading: dict[str, concurrent.futures.Future[LineageFiles]]
    _evictions: dict[str, int]
    _waiting: dict[str, list[NewTrainSample]]
    _gone: dict[str, TenantStats]
    _pending_scan: concurrent.futures.Future[list[tuple[str, int]]] | None
    _pending_scanned_s: float
    _brought_back_at: dict[str, int]
    _followers: FollowerSync
    _journal_polled_s: float

    def _score(self, lineage: Lineage, new: NewTrainSample) -> None:
        raise NotImplementedError  # Trainer's

    def anchors_in_scope(self, scope: Scope) -> list[TrainSample]:
        """The retention guard's anchors (filled at the first warm-up, train/rehearsal.py) whose prompts
        `scope` gives the lineage's version: an anchor it sends to version 0 keeps its answer whatever the
        candidate learned, so its loss under the candidate decides nothing (with the scope off, all)."""
        threshold = self.config.scope_similarity
        return [anchor for anchor in self.anchors.samples
                if scope.covers(self.anchor_words[anchor_index(anchor)], self.prompt_statistics, threshold)]

    def ingest(self) -> int:
        raise NotImplementedError  # Trainer's

    def _tenant_stats(self, lineage: Lineage) -> TenantStats:
        raise NotImplementedError  # Trainer's

    def _lend_learner(self, lineage: Lineage) -> None:
        raise NotImplementedError  # Trainer's

    def _learner_is_free(self) -> bool:
        raise NotImplementedError  # Trainer's: between optimizer steps, no micro-step open

    def lineage_of(self, tenant: str | None) -> str:
        return lineage_of(tenant, self.config)

    def is_resident(self, lineage: str) -> bool:
        """Any thread: whether `lineage` is in memory (a request for it pins its version at once)."""
        return lineage in self.lineages

    def read_files(self, tenant: str) -> LineageFiles:
        """`tenant`'s lineage from the disk (any thread; `request_lineage` runs it on the writer)."""
        with self._lock:
            evictions = self._evictions.get(tenant, 0)
        files = read_lineage(tenant, self.mace_config, self.writer, self.reader, self.learner.parameter_names(),
                             journal_filter(tenant, self.config))
        files.evictions = evictions
        return files

    def request_lineage(self, tenant: str) -> concurrent.futures.Future[LineageFiles]:
        """Any thread: read `tenant`'s lineage on the writer thread, after every write queued before it
        (its own eviction's checkpoint among them); hand the result to `install` on the engine thread."""
        with self._lock:
            future = self._loading.get(tenant)
            if future is None:
                future = self._loading[tenant] = self.writer.submit(lambda: self.read_files(tenant))
                future.add_done_callback(lambda _: self.on_lineage_read())
            return future

    def install(self, files: LineageFiles, score_now: bool = True) -> Lineage:
        """Engine thread: make a lineage read off-thread resident (tensor copies at a step boundary).
        A read that an eviction has overtaken since is read again, here."""
        with self._lock:
            self._loading.pop(files.tenant, None)
            stale = files.evictions != self._evictions.get(files.tenant, 0)
        present = self.lineages.get(files.tenant)
        taking_over = present is not None and not present.is_owned and files.lease is not None
        if present is not None and not taking_over:
            if files.lease is not None and files.lease is not present.lease:
                files.lease.release()
            return present
        if stale:
            if files.lease is not None:
                files.lease.release()
            files = self.read_files(files.tenant)
        lineage = self.lineages[files.tenant] = Lineage.build(files, self.learner, self.config,
                                                              self.anchors_in_scope, self.gate_share)
        if present is not None and present is self.focus and lineage.is_owned:
            # A follower never trains, so no gradient is half-accumulated: its owner's state takes the learner.
            self.learner.unpark(lineage.parked)
            lineage.parked, lineage.on_learner, self.focus = None, True, lineage
        if not lineage.is_owned:  # its owner scores and trains its samples; this server serves its versions
            self._waiting.pop(files.tenant, None)
            log.info("lineage followed: another server owns it", tenant=files.tenant,
                     owner=holder(files.store.root.parent))
            return lineage
        if files.tenant != SHARED:
            self._tenants_seen.add(files.tenant)
        gone = self._gone.pop(files.tenant, None)
        lineage.train_seconds_total = gone.train_seconds_total if gone is not None else 0.0
        # Samples journaled before the read are in its window already (or had aged out of it); those of
        # the window never trained (acknowledged, then a crash or an eviction) are scored first.
        seen = max((row.sample_id for row, _ in files.window), default=0)
        waiting = [new for new in self._waiting.pop(files.tenant, []) if new.sample.sample_id > seen]
        for new in [*(lineage.intake.take_unscored() if score_now else []), *waiting]:
            self._score(lineage, new)
        return lineage

    def resident(self, tenant: str) -> Lineage:
        """Engine thread: `tenant`'s lineage, read from the disk here if it is not in memory (the event
        loop brings lineages back off this thread before it sends their requests; this is the rare
        case where an eviction came in between)."""
        lineage = self.lineages.get(tenant)
        if lineage is None:
            log.info("lineage read on the engine thread", tenant=tenant)
            lineage = self.install(self.read_files(tenant))
        lineage.touch()
        return lineage

    def pin(self, tenant: str, prompt_words: frozenset[str] = frozenset()) -> int:
        """Engine thread: the version a new request of `tenant`'s lineage runs with: its active version,
        or version 0 for a prompt outside what the lineage was taught (`train/scope.py`)."""
        lineage = self.resident(tenant)
        version = lineage.active_version
        if prompt_words:
            if version and not lineage.scope.route(prompt_words, self.prompt_statistics, self.config.scope_similarity):
                version = 0
            self.prompt_statistics.observe(prompt_words)
        return version

    def _install_loaded(self) -> None:
        with self._lock:
            done = [future for future in self._loading.values() if future.done()]
        for future in done:
            try:
                files = future.result()
            except Exception:
                log.exception("a lineage could not be read back; its samples wait for the next one")
                with self._lock:
                    self._loading = {t: f for t, f in self._loading.items() if f is not future}
                continue
            self.install(files)

    def _evict(self, in_use: set[AdapterKey]) -> None:
        """Past `max_resident_tenants`, idle tenants leave memory: those with nothing left to train
        first, then the least recently used. Their learner state is checkpointed (writer thread) and
        their versions unloaded. Idle means no request pinned, no pass queued, no sample waiting, and
        unused for `MIN_IDLE_S`: a lineage just brought back for a request stays until that request
        is in (the bound can be passed for that long). The lineage on the learner counts too, once it
        has nothing left to train (`_resting_on_learner`)."""
        tenants = [lineage for lineage in self.lineages.values() if lineage.tenant != SHARED]
        excess = len(tenants) - self.config.max_resident_tenants
        if excess <= 0:
            return
        pinned = {tenant for tenant, _ in in_use}
        idle = self._idle_tenants(pinned) + self._resting_on_learner(pinned)
        ranked = sorted(idle, key=lambda lineage: (lineage.is_trainable(self.config), lineage.last_used_s))
        for lineage in ranked[:excess]:
            if lineage.on_learner:  # its state is parked first, then checkpointed below
                self._lend_learner(self.lineages[SHARED])
            if lineage.changed_since_checkpoint and lineage.parked is not None:
                lineage.checkpoints.save(lineage.parked, self.reader.cursor)
            self._drop(lineage)
            self._gone[lineage.tenant] = replace(self._tenant_stats(lineage), resident=False)
            with self._lock:
                self._evictions[lineage.tenant] = self._evictions.get(lineage.tenant, 0) + 1
            log.info("lineage evicted to disk", tenant=lineage.tenant)

    def _drop(self, lineage: Lineage) -> None:
        """`lineage` leaves memory; its lease goes once the writes queued for it (checkpoint, versions)
        have landed, so a server taking it over reads them."""
        for version in lineage.gate.learner.loaded_versions:
            self.learner.unload_version(version, lineage.tenant)
        del self.lineages[lineage.tenant]
        lease = lineage.lease
        if lease is not None:
            self.writer.submit(lease.release)

    def _resting_on_learner(self, pinned: Collection[str]) -> list[Lineage]:
        """The tenant whose learner is on the model, when it has nothing left to train and no optimizer
        step is half done: no other lineage may train again to take the learner over, and it would stay
        in memory past the bound until one did."""
        if not self._learner_is_free():
            return []
        return [lineage for lineage in self._idle_tenants(pinned, on_learner_too=True)
                if lineage.on_learner and not lineage.is_trainable(self.config)]

    def _idle_tenants(self, pinned: Collection[str], on_learner_too: bool = False) -> list[Lineage]:
        """Resident tenants' lineages that may leave memory: not on the learner (or, `on_learner_too`,
        on it but to be parked as soon as another lineage trains), no request pinned, no pass queued,
        no sample waiting, and unused for `MIN_IDLE_S`."""
        now = time.monotonic()
        return [lineage for lineage in self.lineages.values()
                if lineage.tenant != SHARED and not lineage.is_busy(on_learner_too) and lineage.tenant not in pinned
                and lineage.tenant not in self._waiting and now - lineage.last_used_s >= MIN_IDLE_S]

    def bring_back_pending(self, pinned: Collection[str] = ()) -> None:
        """Tenants past the resident bound at a restart (or evicted with samples still queued for them)
        keep their acknowledged samples in the journal; while resident tenants leave room, they come
        back to train them without waiting for their next request. The journal is read on the writer
        thread every `PENDING_SCAN_S`; a tenant comes back once per newest untrained sample, so one
        whose samples the intake never trains (held out, gated) does not come and go."""
        if self.config.tenancy != "per_tenant":
            return
        scan = self._pending_scan
        if scan is None:
            if time.monotonic() - self._pending_scanned_s >= PENDING_SCAN_S:
                self._pending_scanned_s = time.monotonic()
                limit = self.config.max_resident_tenants + len(self.lineages)
                self._pending_scan = self.writer.submit(lambda: self.journal.tenants_with_pending(limit))
                self._pending_scan.add_done_callback(lambda _: self.on_lineage_read())  # an idle engine wakes
            return
        if not scan.done():
            return
        self._pending_scan = None
        try:
            pending = scan.result()
        except Exception:
            log.exception("tenants with untrained samples could not be listed; asked again later")
            return
        # Room: below the bound, or a resident with nothing left to train that `_evict` will send back.
        room = self.config.max_resident_tenants - sum(1 for tenant in self.lineages if tenant != SHARED)
        idle = self._idle_tenants(pinned, on_learner_too=True)  # the learner moves to the one brought back
        room += sum(1 for lineage in idle if not lineage.is_trainable(self.config))
        with self._lock:
            room -= len(self._loading)
        for tenant, newest in pending:
            if room <= 0:
                break
            if tenant == SHARED or tenant in self.lineages or self._brought_back_at.get(tenant, 0) >= newest:
                continue
            self._brought_back_at[tenant] = newest
            self.request_lineage(tenant)
            room -= 1

    def follow_store(self) -> None:
        """Engine thread, between steps: serve the versions owners published for the lineages this
        server follows, take over those whose owner is gone, and read samples other servers journaled."""
        now = time.monotonic()
        if now - self._journal_polled_s >= FOLLOW_S:
            self._journal_polled_s = now
            if self.journal.last_id() > self.reader.cursor:
                self.ingest()
        serving = {t: lineage.active_version for t, lineage in self.lineages.items() if not lineage.is_owned}
        try:
            states = self._followers.poll(serving)
        except Exception:
            log.exception("followed lineages could not be read; read again later")
            return
        for state in states:
            lineage = self.lineages.get(state.tenant)
            if lineage is None or lineage.is_owned:
                continue
            if state.owner_gone:  # read again as its owner; it serves as a follower until then
                log.info("lineage's owner is gone; taking it over", tenant=state.tenant)
                self.request_lineage(state.tenant)
                continue
            lineage.store.reload(state.versions, state.active)
            if state.active != lineage.active_version:
                lineage.gate.activate(state.active, state.weights)
                log.info("followed lineage serves its owner's version", tenant=state.tenant, version=state.active)
