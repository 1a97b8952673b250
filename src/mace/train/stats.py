"""What the trainer reports (GET /v1/adapters' training block, /metrics, the dashboard): plain values,
safe to hand from the engine thread to the event loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TENANTS_LISTED = 8  # the top lineages by training time in stats; the rest are summed


@dataclass(frozen=True)
class TenantStats:
    tenant: str
    active_version: int
    num_optimizer_steps: int
    train_seconds_total: float
    train_tokens_total: int
    drift: float
    num_trainable: int
    resting: bool
    resident: bool
    # Its held-out samples' mean loss under its serving version and under its learner (NaN until judged).
    serving_heldout_loss: float = math.nan
    learner_heldout_loss: float = math.nan
    owned: bool = True  # False: another server on the same data dir trains it; this one serves its versions


@dataclass(frozen=True)
class TrainStats:
    policy: str
    active_version: int
    num_optimizer_steps: int
    num_skipped_steps: int
    train_tokens_total: int
    train_seconds_total: float
    learner_loss: float
    serving_heldout_loss: float
    learner_heldout_loss: float
    drift: float
    seconds_since_publish: float
    num_trainable: int
    is_converged: bool
    judged_on_heldout: bool  # False: the gate's losses are on training samples, no sample held out yet
    anchor_loss_rise: float = math.nan  # the last candidate's anchor loss over version 0's (retention guard)
    num_held_back_forgetting: int = 0  # candidates the retention guard held back, every lineage, since start
    num_tenants: int = 0  # tenants' lineages seen since the start (the shared one not counted)
    num_resident_tenants: int = 0
    tenants: tuple[TenantStats, ...] = ()  # the top lineages by training time, at most MAX_TENANTS_LISTED
    other_tenants_train_seconds: float = 0.0  # the rest's training time, summed
    num_requests_in_scope: int = 0  # requests its lineage's active version answered (train/scope.py)
    num_requests_outside_scope: int = 0  # requests turned to version 0, outside what their lineage was taught
