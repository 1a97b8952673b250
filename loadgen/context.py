"""What the users of one run share: the client, the workload, the recorder and the run's clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadgen.metrics import GENERATION_KINDS, RequestRecord
from loadgen.traces import TraceItem
from mace.client import AsyncClient


@dataclass
class Workload:
    """Hands out trace items in order, cycling (closed-loop and Poisson users do not follow the
    trace's clock, only its order), until `limit` items have been handed out."""

    items: list[TraceItem]
    limit: int | None = None
    cycle: bool = True
    claimed: int = 0

    def claim(self) -> TraceItem | None:
        if self.exhausted:
            return None
        item = self.items[self.claimed % len(self.items)]
        self.claimed += 1
        return item

    @property
    def exhausted(self) -> bool:
        if not self.items or (self.limit is not None and self.claimed >= self.limit):
            return True
        return not self.cycle and self.claimed >= len(self.items)


@dataclass
class Recorder:
    """Every record and event of the run, plus short windows of recent latencies for the live view."""

    records: list[RequestRecord] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    adapter_version: int | None = None  # the shared lineage's (requests without a tenant)
    tenant_versions: dict[str, int] = field(default_factory=dict)  # each tenant's lineage
    window: int = 200
    recent_ttft: deque[float] = field(default_factory=deque)
    recent_tpot: deque[float] = field(default_factory=deque)
    listeners: list[Callable[[RequestRecord], None]] = field(default_factory=list)

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        if record.ok and record.kind in GENERATION_KINDS:
            if record.ttft_s is not None:
                _push(self.recent_ttft, record.ttft_s, self.window)
            if (tpot := record.tpot_s) is not None:
                _push(self.recent_tpot, tpot, self.window)
            if record.adapter_version is not None:
                self.note_adapter(record.adapter_version, record.end_s or record.start_s, "response", record.tenant)
        for listener in self.listeners:
            listener(record)

    def note_adapter(self, version: int, time_s: float, source: str, tenant: str | None = None) -> None:
        """An adapter version newer than any seen so far was published (as seen by `source`).
        Only increases count: a request started before a publish may still report the old one.
        Each tenant's lineage has its own versions; its events carry `tenant`."""
        if tenant is not None:
            last = self.tenant_versions.get(tenant)
            if last is None or version > last:
                self.tenant_versions[tenant] = version
                self.events.append({"kind": "adapter", "time_s": time_s, "version": version, "source": source,
                                    "initial": last is None, "tenant": tenant})
            return
        if self.adapter_version is None or version > self.adapter_version:
            first = self.adapter_version is None
            self.adapter_version = version
            self.events.append({"kind": "adapter", "time_s": time_s, "version": version, "source": source,
                                "initial": first})

    def counts(self) -> tuple[int, int]:
        """(done, failed) generation requests so far."""
        generations = [r for r in self.records if r.kind in GENERATION_KINDS and r.status != "cancelled"]
        failed = sum(not r.ok for r in generations)
        return len(generations) - failed, failed


def _push(window: deque[float], value: float, size: int) -> None:
    window.append(value)
    if len(window) > size:
        window.popleft()


@dataclass
class RunContext:
    client: AsyncClient  # every call to the server goes through the SDK: generation, feedback, adapters
    workload: Workload
    recorder: Recorder
    seed: int = 0
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0})
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = field(default_factory=time.perf_counter)

    def now(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early if the run stops; False when it did."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)
        return not self.stopping

    async def sleep_until(self, run_time_s: float) -> bool:
        return await self.sleep(run_time_s - self.now())
