"""GET /v1/stats: the running server's live numbers as one small JSON object (what /dashboard polls).

Latency percentiles and rates cover a recent window (`?window_s=`, default 10). They come from
differencing snapshots of the Prometheus metrics the request path already records, kept in a small
bounded ring here, so serving pays nothing for them. Percentiles are interpolated within histogram
buckets, as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Histogram

from mace.engine.api import AdapterVersion, EngineLoad, TenantStats, TrainStats
from mace.server.auth import PRINCIPAL, Principal, may_list
from mace.server.errors import ApiError, dumps
from mace.server.keys import RUNTIME
from mace.server.metrics import ServerMetrics
from mace.server.runtime import Runtime

DEFAULT_WINDOW_S = 10.0
MAX_WINDOW_S = 120.0
_SNAPSHOT_EVERY_S = 0.2  # several dashboards polling share one snapshot
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Buckets:
    """A histogram's cumulative bucket counts; the last bound is +inf."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @classmethod
    def read(cls, histogram: Histogram) -> Buckets:
        samples = [s for metric in histogram.collect() for s in metric.samples if s.name.endswith("_bucket")]
        return cls(tuple(float(s.labels["le"]) for s in samples), tuple(s.value for s in samples))

    def minus(self, older: Buckets) -> Buckets:
        return Buckets(self.bounds, tuple(a - b for a, b in zip(self.counts, older.counts, strict=True)))

    @property
    def total(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding rank q; None without observations."""
        if self.total <= 0:
            return None
        rank = q * self.total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):  # past the last finite bound all we know is "at least this"
                    return lower_bound
                inside = count - lower_count
                return lower_bound + (bound - lower_bound) * ((rank - lower_count) / inside if inside else 1.0)
            lower_bound, lower_count = bound, count
        return lower_bound


@dataclass(frozen=True)
class Snapshot:
    time_s: float  # monotonic
    ttft: Buckets
    tpot: Buckets
    train_s: float

    @property
    def num_tokens(self) -> float:
        """Tokens streamed so far: each one observed either a TTFT or an inter-token latency."""
        return self.ttft.total + self.tpot.total

    @classmethod
    def take(cls, metrics: ServerMetrics, stats: EngineLoad | None) -> Snapshot:
        return cls(
            time.monotonic(),
            Buckets.read(metrics.time_to_first_token),
            Buckets.read(metrics.inter_token_latency),
            stats.train.train_seconds_total if stats is not None and stats.train is not None else 0.0,
        )


class StatsWindow:
    """The ring of recent snapshots, and the adapter versions read from disk now and then."""

    def __init__(self) -> None:
        self.ring: deque[Snapshot] = deque(maxlen=int(MAX_WINDOW_S / _SNAPSHOT_EVERY_S) + 2)

    def observe(self, runtime: Runtime, stats: EngineLoad | None) -> Snapshot:
        if not self.ring or time.monotonic() - self.ring[-1].time_s >= _SNAPSHOT_EVERY_S:
            self.ring.append(Snapshot.take(runtime.metrics, stats))
        return self.ring[-1]

    def since(self, window_s: float) -> Snapshot:
        """The oldest snapshot inside the window (the newest one when the ring holds no older)."""
        horizon = self.ring[-1].time_s - window_s
        return next(s for s in self.ring if s.time_s >= horizon)


STATS_WINDOW = web.AppKey("stats_window", StatsWindow)
routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    app[STATS_WINDOW] = StatsWindow()
    app.add_routes(routes)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _version(version: AdapterVersion) -> dict[str, Any]:
    return {**asdict(version), "serving_loss": _finite(version.serving_loss),
            "learner_loss": _finite(version.learner_loss)}


def _window(request: web.Request) -> float:
    raw = request.query.get("window_s", str(DEFAULT_WINDOW_S))
    try:
        window_s = float(raw)
    except ValueError:
        window_s = math.nan
    if not 0.5 <= window_s <= MAX_WINDOW_S:
        raise ApiError(400, f"window_s must be a number of seconds from 0.5 to {MAX_WINDOW_S:g}", param="window_s")
    return window_s


def _latency(now: Snapshot, then: Snapshot) -> dict[str, Any]:
    ttft, tpot = now.ttft.minus(then.ttft), now.tpot.minus(then.tpot)
    return {
        "ttft_s": {f"p{round(q * 100)}": ttft.quantile(q) for q in QUANTILES},
        "tpot_s": {f"p{round(q * 100)}": tpot.quantile(q) for q in QUANTILES},
        "num_first_tokens": int(ttft.total),
        "num_next_tokens": int(tpot.total),
    }


def _rate(now: float, then: float, span_s: float) -> float | None:
    return (now - then) / span_s if span_s > 0 else None


def _engine(stats: EngineLoad) -> dict[str, Any]:
    budget_bytes, used_bytes = stats.kv_budget_bytes, stats.kv_used_bytes
    return {
        "requests": {"running": stats.num_running, "waiting": stats.num_waiting,
                     "preemptions": stats.num_preemptions},
        "kv": {"used_bytes": used_bytes, "budget_bytes": budget_bytes, "allocated_bytes": stats.kv_bytes_allocated,
               "usage": used_bytes / budget_bytes if budget_bytes else 0.0},
    }


def _tenant(tenant: TenantStats) -> dict[str, Any]:
    return {
        "tenant": tenant.tenant,
        "active_version": tenant.active_version,
        "optimizer_steps": tenant.num_optimizer_steps,
        "train_seconds_total": tenant.train_seconds_total,
        "tokens_total": tenant.train_tokens_total,
        "drift": _finite(tenant.drift),
        "pending_samples": tenant.num_trainable,
        "resting": tenant.resting,
        "resident": tenant.resident,
        "owned": tenant.owned,
        "serving_heldout_loss": _finite(tenant.serving_heldout_loss),
        "learner_heldout_loss": _finite(tenant.learner_heldout_loss),
    }


def _tenants(train: TrainStats, principal: Principal) -> dict[str, Any]:
    """The counts, and the lineages that trained longest; a key sees only the names it may list itself,
    so one tenant does not learn who the others are."""
    top = [_tenant(t) for t in train.tenants if may_list(principal, t.tenant)]
    return {"count": train.num_tenants, "resident": train.num_resident_tenants, "top": top}


def _train(stats: EngineLoad, now: Snapshot, then: Snapshot, span_s: float,
           principal: Principal) -> dict[str, Any] | None:
    train = stats.train
    if train is None:
        return None
    share = _rate(now.train_s, then.train_s, span_s)
    return {
        "policy": train.policy,
        "time_share": min(1.0, max(0.0, share)) if share is not None else None,  # of wall-clock time
        "learner_loss": _finite(train.learner_loss),
        "learner_heldout_loss": _finite(train.learner_heldout_loss),
        "serving_heldout_loss": _finite(train.serving_heldout_loss),
        # what the gate's two losses were measured on: until a sample is held out, the newest training samples
        "gate_slice": "held_out" if train.judged_on_heldout else "training_samples",
        # the retention guard: the last candidate's loss on version 0's own general answers, over version 0's
        "anchor_loss_rise": _finite(train.anchor_loss_rise),
        "held_back_for_forgetting": train.num_held_back_forgetting,
        # requests answered by their lineage's active version, and those outside what it was taught,
        # answered by version 0 (train.scope_similarity), since the start
        "scope": {"in": train.num_requests_in_scope, "outside": train.num_requests_outside_scope},
        "drift": _finite(train.drift),
        "optimizer_steps": train.num_optimizer_steps,
        "tokens_total": train.train_tokens_total,
        "pending_samples": train.num_trainable,
        "resting": train.is_converged,  # the learner fits every sample it has: `mace` waits for new feedback
        "seconds_since_publish": _finite(train.seconds_since_publish),
        "tenants": _tenants(train, principal),
    }


@routes.get("/v1/stats")
async def get_stats(request: web.Request) -> web.Response:
    window_s = _window(request)
    runtime = request.app[RUNTIME]
    board = request.app[STATS_WINDOW]
    stats = runtime.load()
    now = board.observe(runtime, stats)
    then = board.since(window_s)
    span_s = now.time_s - then.time_s
    body: dict[str, Any] = {
        "object": "stats", "time": time.time(), "model": runtime.served_model_name, "ready": runtime.is_ready,
        "load_error": runtime.load_error, "window_s": span_s,
        "latency": _latency(now, then),
        # Counted as streamed, not when requests finish, so a long generation shows up while it runs.
        "generation_tokens_per_s": _rate(now.num_tokens, then.num_tokens, span_s),
        "requests": None, "kv": None, "train": None, "adapters": None,
    }
    engine = runtime.engine
    if stats is not None and engine is not None:
        # The shared lineage's, from memory: a poll must not read a tenant's lineage back from disk. Each
        # tenant's active version is in train.tenants.
        catalog = engine.adapters()
        body.update(_engine(stats))
        body["train"] = _train(stats, now, then, span_s, request[PRINCIPAL])
        body["adapters"] = {
            "active": catalog.active,
            "auto_publish": catalog.auto_publish,
            "versions": [_version(v) for v in catalog.versions],
        }
    return web.json_response(body, dumps=dumps, headers={"Cache-Control": "no-store"})
