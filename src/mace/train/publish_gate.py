"""The publish gate and the adapter versions it makes (engine thread).

Once the learner has optimizer steps it has not judged, the gate freezes it as the `candidate` adapter
and asks for both versions' losses on its slice (`open`: loss passes the trainer queues as upkeep,
training going on meanwhile): the held-out slice, or the newest training samples while no sample is
held out yet (`Intake.gate_slice`). When the last loss is in (`record`), it judges that snapshot:
published if better by `publish_margin`, or no worse after `max_staleness_s`, at most every
`min_publish_interval_s`. Version numbers are counted in memory from the store's newest at start.

The retention guard: a candidate the slice would publish is then asked for its loss on the anchors,
version 0's own greedy answers to general questions (train/rehearsal.py), and held back if its mean
anchor loss exceeds version 0's by more than `train.retention_guard` per token. The held-out slice
only holds what users taught; an adapter trained on it until it fits can learn a shortcut (answer
everything with the taught fact) that the slice scores as better. The anchors see that. A candidate
the slice holds back is not asked: its anchor passes would decide nothing.

The gate's passes take the slack training would use, so it keeps to `GATE_SHARE` of the time both
spend: the next evaluation opens once training has run for twice the seconds the last one's passes
took (`GateShare.charge_training`, `GateShare.charge_evaluation`: compute, not the wall clock, which
stretches both alike under load), or at once while training rests. On a drifting trace with a slice of 16 samples and
eight anchors, an evaluation every 10 s took three times training's share.

The share is the machine's, not each gate's (`GateShare`, one per trainer): with one account per
lineage, 16 tenants' gates each waited only for their own last evaluation, so every optimizer step
of any lineage was followed by an evaluation of its gate (on the tenants trace, 138 publishes for
141 steps), and the gates took about three quarters of training's time.

Each lineage (train/lineage.py) has its own gate, store and version numbers; the gate sees the learner
through `GateLearner`, bound to its lineage. One candidate adapter serves every gate, so one
evaluation is open at a time (`Trainer.upkeep_stages`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
import torch
from peft import LoraConfig

from mace.config import TrainConfig
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.drift import DriftSignal
from mace.train.intake import GateSlice
from mace.train.learner import BASE, CANDIDATE, LEARNER, save_adapter
from mace.train.replay import TrainSample, half_life_decay
from mace.train.tasks import LossPurpose, LossRequest, LossResult

log = structlog.get_logger(__name__)

GATE_SHARE = 1 / 3  # at most this share of the seconds training and the gate's passes spend together


class GateShare:
    """The seconds the publish gates' passes and training have spent, machine-wide (`GATE_SHARE`): one
    account shared by every lineage's gate, since one evaluation is open at a time, whoever's."""

    def __init__(self) -> None:
        self.trained_s = 0.0  # training since the last evaluation closed
        self.evaluation_s = 0.0  # loss passes while the open one was pending
        self.last_evaluation_s = 0.0  # the same for the last one, once closed

    def charge_training(self, seconds: float) -> None:
        """The learner trained for `seconds` (micro-step stages, of any lineage)."""
        self.trained_s += seconds

    def charge_evaluation(self, seconds: float) -> None:
        """Loss passes ran for `seconds` while an evaluation was open (scores joined, counted too)."""
        self.evaluation_s += seconds

    def allows(self) -> bool:
        """Training has run for the seconds the last evaluation's passes earned it."""
        return self.trained_s >= self.last_evaluation_s * (1 / GATE_SHARE - 1)

    def close(self) -> None:
        self.last_evaluation_s, self.evaluation_s, self.trained_s = self.evaluation_s, 0.0, 0.0


def recency_weighted_mean(losses: list[float], half_life: float, weights: list[float] | None = None) -> float:
    """The mean of `losses` (oldest first) with a weight that halves every `half_life` samples back
    from the newest: the publish gate judges a version on what users say now, and an answer they
    have since corrected (a fact that changed) counts less than its correction. `weights`: each
    loss's own weight besides (`GateSlice.weights`)."""
    own = weights or [1.0] * len(losses)
    weights = [half_life_decay(len(losses) - 1 - index, half_life) * own[index] for index in range(len(losses))]
    return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)


@dataclass
class Evaluation:
    """Losses of the candidate and of the serving version on the gate's slice, one sample per pass."""

    samples: list[TrainSample]  # oldest first
    serving_version: int
    held_out: bool = True  # False: judged on training samples, no sample being held out yet
    weights: list[float] | None = None  # each sample's, besides recency (`GateSlice.weights`)
    learner_losses: dict[int, float] = field(default_factory=dict)  # by sample id
    serving_losses: dict[int, float] = field(default_factory=dict)
    anchors: list[TrainSample] = field(default_factory=list)  # the retention guard's; empty: guard off
    anchor_losses: dict[int, float] = field(default_factory=dict)  # the candidate's, by anchor id
    anchor_base_losses: dict[int, float] = field(default_factory=dict)  # version 0's
    anchors_asked: bool = False  # the slice's losses were in and would publish: the anchors' were asked

    @property
    def is_complete(self) -> bool:
        return (len(self.learner_losses) == len(self.serving_losses) == len(self.samples)
                and len(self.anchor_losses) == len(self.anchor_base_losses) == len(self.anchors))

    def anchor_loss_rise(self) -> float:
        """How much higher the candidate's mean anchor loss is than version 0's (nan: no anchors)."""
        if not self.anchors:
            return math.nan
        ids = [a.sample_id for a in self.anchors]
        return (sum(self.anchor_losses[i] for i in ids) - sum(self.anchor_base_losses[i] for i in ids)) / len(ids)


@dataclass(frozen=True)
class AdapterCatalog:
    """Published versions as the server lists them (read from any thread)."""

    versions: tuple[AdapterVersion, ...]
    auto_publish: bool  # False while an operator's choice of an older version holds publishing
    active: int = 0  # the version the lineage's new requests pin

    def has(self, version: int) -> bool:
        return version == 0 or any(v.version == version for v in self.versions)


class GateLearner(Protocol):
    """The learner as one lineage's gate uses it (`lineage.LineageLearner`)."""

    lora_config: LoraConfig

    @property
    def num_optimizer_steps(self) -> int: ...

    @property
    def loaded_versions(self) -> set[int]: ...

    def adapter_for(self, version: int) -> str: ...

    def snapshot_candidate(self) -> None: ...

    def publish(self, version: int, source: str = LEARNER) -> None: ...

    def version_weights(self, version: int) -> dict[str, torch.Tensor]: ...

    def load_version(self, version: int, directory: Path) -> None: ...

    def install_version(self, version: int, weights: dict[str, torch.Tensor]) -> None: ...


class PublishGate:
    def __init__(self, learner: GateLearner, store: AdapterStore, drift: DriftSignal, config: TrainConfig,
                 anchors: Callable[[], list[TrainSample]] = list, share: GateShare | None = None,
                 tenant: str | None = None) -> None:
        self.learner = learner
        # With a gate per tenant, a publish or a hold-back in the log says whose.
        self.log = log if tenant is None else log.bind(tenant=tenant)
        self.share = share or GateShare()  # the trainer's, shared by every lineage's gate
        self.anchors = anchors  # the retention guard's, read when an evaluation opens (made at warm-up)
        self.store = store
        self.drift = drift
        self.config = config
        self.active_version = 0
        self.publishing_held = False  # an operator chose a version by hand: keep it until they choose the newest
        self.last_publish_s = time.monotonic()
        self.serving_heldout_loss = math.nan
        self.learner_heldout_loss = math.nan
        self.judged_on_heldout = True  # False: the losses above are on training samples (none held out yet)
        self.anchor_loss_rise = math.nan  # the last candidate's, against version 0 (the retention guard)
        self.num_held_back_forgetting = 0  # candidates the retention guard held back, since start
        self._anchor_base_losses: dict[int, float] = {}  # version 0 never changes: measured once
        self._next_version = store.newest() + 1
        self._pending: Evaluation | None = None
        self._follow_up: list[LossRequest] = []  # the anchors' passes, asked once the slice would publish
        self._serving_losses: dict[int, float] = {}  # held-out sample id -> loss under `_serving_losses_version`
        self._serving_losses_version = -1
        self.judged_steps = 0  # the learner's optimizer steps when the last candidate was frozen
        self.num_held_back = 0  # evaluations in a row that published nothing, since a publish or new samples

    @property
    def is_pending(self) -> bool:
        """An evaluation is open: its candidate holds the one candidate adapter."""
        return self._pending is not None

    def is_due(self, paced: bool = True) -> bool:
        """Whether a candidate may be judged now: none pending, publishing not held by an operator, optimizer
        steps since the last candidate, `min_publish_interval_s` passed, and (`paced`: training has more to
        do) the gate within its share."""
        within_share = not paced or self.share.allows()
        return (self._pending is None and not self.publishing_held and within_share
                and self.learner.num_optimizer_steps != self.judged_steps
                and time.monotonic() - self.last_publish_s >= self.config.min_publish_interval_s)

    def open(self, gate_slice: GateSlice, paced: bool = True) -> list[LossRequest]:
        """Freeze the learner as the candidate and ask for the losses on `gate_slice` (none: not now;
        `paced` as `is_due`)."""
        heldout = gate_slice.samples
        if not heldout or not self.is_due(paced):
            return []
        self.judged_steps = self.learner.num_optimizer_steps
        if self._serving_losses_version != self.active_version:
            self._serving_losses, self._serving_losses_version = {}, self.active_version
        # Training goes on during the evaluation; the gate judges, and publishes, this snapshot.
        self.learner.snapshot_candidate()
        evaluation = self._pending = Evaluation(heldout, self.active_version, gate_slice.held_out,
                                                   gate_slice.weights)
        serving = self.learner.adapter_for(self.active_version)
        requests = []
        for sample in heldout:
            requests.append(LossRequest(sample, LossPurpose.CANDIDATE, CANDIDATE))
            if sample.sample_id in self._serving_losses:  # the serving version has not changed since
                evaluation.serving_losses[sample.sample_id] = self._serving_losses[sample.sample_id]
            else:
                requests.append(LossRequest(sample, LossPurpose.SERVING, serving))
        return requests

    def _ask_anchors(self, evaluation: Evaluation) -> None:
        """The retention guard's passes for a candidate the slice would publish (`take_requests`)."""
        evaluation.anchors_asked = True
        evaluation.anchors = self.anchors()
        for anchor in evaluation.anchors:
            self._follow_up.append(LossRequest(anchor, LossPurpose.ANCHOR, CANDIDATE))
            if anchor.sample_id in self._anchor_base_losses:
                evaluation.anchor_base_losses[anchor.sample_id] = self._anchor_base_losses[anchor.sample_id]
            else:
                self._follow_up.append(LossRequest(anchor, LossPurpose.ANCHOR_BASE, BASE))

    def take_requests(self) -> list[LossRequest]:
        """Passes the open evaluation asked for since `open` (the anchors'), to queue as `open`'s were."""
        requests, self._follow_up = self._follow_up, []
        return requests

    def record(self, result: LossResult) -> int | None:
        """One loss; when the slice's are in and it would publish, the anchors' are asked (`take_requests`);
        when the evaluation is complete, the decision (the version published, if any)."""
        evaluation = self._pending
        assert evaluation is not None, "a held-out loss arrived with no evaluation open"
        sample_id = result.request.sample.sample_id
        purpose = result.request.purpose
        if purpose is LossPurpose.CANDIDATE:
            evaluation.learner_losses[sample_id] = result.loss
        elif purpose is LossPurpose.ANCHOR:
            evaluation.anchor_losses[sample_id] = result.loss
        elif purpose is LossPurpose.ANCHOR_BASE:
            evaluation.anchor_base_losses[sample_id] = result.loss
            if math.isfinite(result.loss):  # a failed pass is asked again at the next evaluation
                self._anchor_base_losses[sample_id] = result.loss
        else:
            evaluation.serving_losses[sample_id] = self._serving_losses[sample_id] = result.loss
        if not evaluation.is_complete:
            return None
        if not evaluation.anchors_asked and self.config.retention_guard > 0 and self._would_publish(evaluation):
            self._ask_anchors(evaluation)
            if not evaluation.is_complete:
                return None
        self._pending = None
        self.share.close()
        return self.decide(evaluation)

    def _slice_losses(self, evaluation: Evaluation) -> tuple[float, float]:
        """The candidate's and the serving version's recency-weighted mean loss on the slice."""
        half_life = self.config.heldout_half_life
        samples, weights = evaluation.samples, evaluation.weights
        learner = recency_weighted_mean([evaluation.learner_losses[s.sample_id] for s in samples], half_life, weights)
        serving = recency_weighted_mean([evaluation.serving_losses[s.sample_id] for s in samples], half_life, weights)
        return learner, serving

    def _passes_slice(self, learner: float, serving: float) -> tuple[bool, bool]:
        """(better by the margin, stale and no worse): either publishes, the retention guard willing."""
        better = learner < serving * (1.0 - self.config.publish_margin)
        stale = time.monotonic() - self.last_publish_s > self.config.max_staleness_s and learner <= serving
        return better, stale

    def _would_publish(self, evaluation: Evaluation) -> bool:
        learner, serving = self._slice_losses(evaluation)
        return (evaluation.serving_version == self.active_version and not self.publishing_held
                and math.isfinite(learner) and math.isfinite(serving) and any(self._passes_slice(learner, serving)))

    def decide(self, evaluation: Evaluation) -> int | None:
        if evaluation.serving_version != self.active_version or self.publishing_held:
            return None  # an operator chose a version meanwhile
        learner, serving = self._slice_losses(evaluation)
        self.learner_heldout_loss, self.serving_heldout_loss = learner, serving
        self.judged_on_heldout = evaluation.held_out
        if not (math.isfinite(learner) and math.isfinite(serving)):
            return None
        self.drift.on_evaluation(serving, learner)
        better, stale = self._passes_slice(learner, serving)
        judged_on = "held-out" if evaluation.held_out else "its training samples (none held out yet)"
        rise = self.anchor_loss_rise = evaluation.anchor_loss_rise()
        # No anchors (none made yet, or the guard off): nothing to judge. A non-finite anchor loss holds back.
        if (better or stale) and evaluation.anchors and not rise <= self.config.retention_guard:
            self.num_held_back += 1
            self.num_held_back_forgetting += 1
            self.log.info("publish gate held the learner back: it forgets general answers",
                          anchor_loss_rise=round(rise, 4), guard=self.config.retention_guard,
                          serving_loss=round(serving, 4), learner_loss=round(learner, 4))
            return None
        if not (better or stale):
            self.num_held_back += 1
            self.log.info("publish gate held the learner back", serving_loss=round(serving, 4),
                          learner_loss=round(learner, 4), drift=round(self.drift.ratio, 3), judged_on=judged_on)
            return None
        reason = f"better on {judged_on}" if better else f"stale, no worse on {judged_on}"
        version = self.publish(serving, learner, reason, source=CANDIDATE)
        # The candidate's weights serve now: its losses on the slice are the new version's, not asked again.
        self._serving_losses, self._serving_losses_version = dict(evaluation.learner_losses), version
        return version

    def publish(self, serving_loss: float, learner_loss: float, reason: str, source: str = LEARNER) -> int:
        version, self._next_version = self._next_version, self._next_version + 1
        self.learner.publish(version, source)
        meta = AdapterVersion(version, self.store.now(), serving_loss, learner_loss,
                              self.learner.num_optimizer_steps, reason)
        weights, lora_config = self.learner.version_weights(version), self.learner.lora_config
        self.store.write(meta, lambda directory: save_adapter(directory, weights, lora_config))
        self.store.set_active(version)
        self.active_version = version
        self.serving_heldout_loss = learner_loss  # what the gate measured is what serves now
        self.last_publish_s = time.monotonic()
        self.num_held_back = 0
        self.drift.on_publish(serving_loss, learner_loss)
        self.log.info("adapter published", version=version, serving_loss=serving_loss, learner_loss=learner_loss,
                      reason=reason)
        return version

    def activate(self, version: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Serve `version` to new requests; `weights`: its weights read off the engine thread, if not loaded."""
        if version != 0 and version not in self.learner.loaded_versions:
            if weights is not None:
                self.learner.install_version(version, weights)
            else:
                self.store.flush()  # a version published moments ago may still be on its way to disk
                self.learner.load_version(version, self.store.path(version))
        self.store.set_active(version)
        if version != self.active_version:  # its loss on the slice is not known until the next gate
            self.active_version, self.serving_heldout_loss = version, math.nan
        self.publishing_held = version != self.store.newest()

    def restore(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Serve the version a restart finds active (`weights`: read off the engine thread), with the
        publish scores it was published with as the drift's reference."""
        active = self.store.active()
        if not (active and self.store.exists(active)):
            return
        self.activate(active, weights)
        self.last_publish_s = time.monotonic()
        meta = next((v for v in self.store.versions() if v.version == active), None)
        if meta is not None and meta.serving_loss is not None and meta.learner_loss is not None:
            self.drift.on_publish(meta.serving_loss, meta.learner_loss)

    def catalog(self) -> AdapterCatalog:
        return AdapterCatalog(tuple(self.store.versions()), auto_publish=not self.publishing_held,
                              active=self.active_version)
