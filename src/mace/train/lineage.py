"""A lineage: one tenant's learning (mace/tenancy.py), beside every other tenant's on the one model.

Each lineage has its own samples (replay buffer and held-out slice, `Intake`), drift signal, publish
gate, published versions (`AdapterStore` under its directory) and learner checkpoint. The model has
one trainable `learner` adapter, lent to one lineage at a time (`Trainer`): the others' learner
weights and AdamW moments wait in memory as their `parked` state.

A lineage that has not been used for a while leaves memory (`Trainer`, `train.max_resident_tenants`):
its parked state is checkpointed by the writer thread, and its samples stay in the journal. It comes
back through `read_lineage`, which runs on the writer thread too, after every write queued before it
(so after its own eviction's checkpoint), and reads only the disk: the store, the checkpoint, the
active version's weights and the journal's recent window, tokenized. The engine thread then builds
the `Lineage` from those files at a step boundary, a few tensor copies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig

from mace.config import MaceConfig, TrainConfig
from mace.tenancy import SHARED, tenant_dir
from mace.train.adapters import AdapterStore
from mace.train.checkpoint import Checkpoints
from mace.train.drift import DriftSignal
from mace.train.intake import Intake, SampleReader
from mace.train.journal import StoredSample
from mace.train.learner import LEARNER, Learner, LearnerState, read_adapter
from mace.train.lease import LineageLease
from mace.train.publish_gate import GateShare, PublishGate
from mace.train.replay import ReplayBuffer, TrainSample
from mace.train.scope import Scope, prompt_words
from mace.train.writer import DiskWriter


@dataclass
class LineageFiles:
    """What a lineage needs from the disk, read off the engine thread (`read_lineage`)."""

    tenant: str
    store: AdapterStore
    checkpoints: Checkpoints
    learner_state: LearnerState | None
    window: list[tuple[StoredSample, TrainSample]]
    active_weights: dict[str, torch.Tensor] | None  # the active version's, None for version 0
    lease: LineageLease | None  # None: another server owns the lineage, this one follows it (train/lease.py)
    evictions: int = 0  # the tenant's eviction count when the read was asked for (`Trainer.install`)


def read_lineage(tenant: str, config: MaceConfig, writer: DiskWriter, reader: SampleReader,
                 parameter_names: list[str], tenancy_journal_filter: str | None) -> LineageFiles:
    """Disk only (any thread). `tenancy_journal_filter`: the journal rows of this lineage (None: all of
    them, for the one lineage of `train.tenancy = "shared"`)."""
    root = tenant_dir(config.data_dir, tenant)
    lease = LineageLease.try_take(root)
    try:
        store = AdapterStore(root / "adapters", writer, read_only=lease is None)
        checkpoints = Checkpoints(root / "checkpoints" / "learner.pt", writer)
        active = store.active()
        weights = read_adapter(store.path(active)) if active and store.exists(active) else None
        if lease is None:  # a follower trains nothing: no learner state, no samples
            return LineageFiles(tenant, store, checkpoints, None, [], weights, None)
        return LineageFiles(tenant, store, checkpoints, checkpoints.read(parameter_names),
                            reader.window(tenancy_journal_filter), weights, lease)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


class LineageLearner:
    """The learner as one lineage's publish gate sees it (`publish_gate.GateLearner`): its own version
    numbers, its optimizer steps, and its learner weights whether they are on the model or parked."""

    def __init__(self, learner: Learner, lineage: Lineage) -> None:
        self._learner = learner
        self._lineage = lineage
        self.lora_config: LoraConfig = learner.lora_config

    @property
    def _tenant(self) -> str:
        return self._lineage.tenant

    @property
    def num_optimizer_steps(self) -> int:
        return self._lineage.num_optimizer_steps

    @property
    def loaded_versions(self) -> set[int]:
        return {version for tenant, version in self._learner.loaded_keys if tenant == self._tenant}

    def adapter_for(self, version: int) -> str:
        return self._learner.adapter_for(version, self._tenant)

    def _off_model(self) -> LearnerState | None:
        """Its learner's state when another lineage's is on the model (a new lineage's: as initialised)."""
        if self._lineage.on_learner:
            return None
        return self._lineage.parked or self._learner.initial_state

    def snapshot_candidate(self) -> None:
        self._learner.snapshot_candidate(self._off_model())

    def publish(self, version: int, source: str = LEARNER) -> None:
        parked = self._off_model()
        if source == LEARNER and parked is not None:
            self._learner.install_version(version, parked.weights, self._tenant)
        else:
            self._learner.publish(version, source, self._tenant)

    def version_weights(self, version: int) -> dict[str, torch.Tensor]:
        return self._learner.version_weights(version, self._tenant)

    def load_version(self, version: int, directory: Path) -> None:
        self._learner.load_version(version, directory, self._tenant)

    def install_version(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        self._learner.install_version(version, weights, self._tenant)


@dataclass
class Lineage:
    tenant: str
    intake: Intake
    checkpoints: Checkpoints
    # Its learner while another lineage's is on the model (None while on the model, or never trained).
    parked: LearnerState | None = None
    on_learner: bool = False
    train_seconds_total: float = 0.0
    train_tokens_total: int = 0
    learner_loss: float = math.nan
    last_used_s: float = field(default_factory=time.monotonic)
    num_queued_passes: int = 0  # loss passes queued for it: it stays resident until they are in
    changed_since_checkpoint: bool = False
    # Fair share of training time (stride scheduling, train/fair_share.py): seconds trained,
    # divided by its share, since it last had samples to train.
    virtual_s: float = 0.0
    share: float = 1.0
    was_eligible: bool = False
    lease: LineageLease | None = None  # None: a follower of the server that owns it (train/lease.py)
    scope: Scope = field(default_factory=Scope)  # the prompts its versions answer (train/scope.py)
    gate: PublishGate = field(init=False)  # built once the lineage exists: the gate's learner view reads it
    learner: Learner = field(init=False)  # the model's learner, on which its state sits while `on_learner`

    @classmethod
    def build(cls, files: LineageFiles, learner: Learner, config: TrainConfig,
              anchors: Callable[[Scope], list[TrainSample]] = lambda scope: [],
              gate_share: GateShare | None = None) -> Lineage:
        """On the engine thread: the lineage from its files (tensor copies only)."""
        replay = ReplayBuffer(config.replay_window, config.freshness_half_life_s)
        drift = DriftSignal(loss_floor=config.converged_loss)
        intake = Intake(config, replay, drift)
        lineage = cls(files.tenant, intake, files.checkpoints, parked=files.learner_state, lease=files.lease)
        lineage.learner = learner
        # The retention guard judges the anchors this lineage's scope would give its versions.
        lineage.gate = PublishGate(LineageLearner(learner, lineage), files.store, drift, config,
                                   lambda: anchors(lineage.scope), gate_share, tenant=files.tenant)
        lineage.gate.restore(files.active_weights)
        intake.resume(files.window)
        for row, _ in files.window:
            lineage.scope.teach(prompt_words(row.prompt))
        return lineage

    @property
    def is_owned(self) -> bool:
        """Whether this server trains it and writes its versions (else it follows the owner's)."""
        return self.lease is not None

    @property
    def store(self) -> AdapterStore:
        return self.gate.store

    @property
    def replay(self) -> ReplayBuffer:
        return self.intake.replay

    @property
    def drift(self) -> DriftSignal:
        return self.intake.drift

    @property
    def active_version(self) -> int:
        return self.gate.active_version

    @property
    def num_optimizer_steps(self) -> int:
        return self._steps()[0]

    @property
    def num_skipped_steps(self) -> int:
        return self._steps()[1]

    def _steps(self) -> tuple[int, int]:
        if self.on_learner:
            return self.learner.num_optimizer_steps, self.learner.num_skipped_steps
        if self.parked is None:
            return 0, 0
        return self.parked.num_optimizer_steps, self.parked.num_skipped_steps

    def is_converged(self, config: TrainConfig) -> bool:
        """Nothing left to gain from its samples: the learner fits every one, or the gate held it back
        `rest_after_held_back` times in a row with no new sample (`Trainer.is_converged`). Never while a
        sample in the window that it does not fit yet has not been trained once: an acknowledged sample is
        always learned from, and a resting tenant past the resident bound would leave memory with it
        untrained (one scored as fit already, a repeat of a learned answer, has nothing to teach)."""
        if self.replay.has_unlearned(config.converged_loss):
            return False
        plateau = self.gate.num_held_back >= config.rest_after_held_back
        return plateau or self.replay.all_fit(config.converged_loss)

    def is_trainable(self, config: TrainConfig) -> bool:
        return self.is_owned and len(self.replay) > 0 and not self.is_converged(config)

    def expected_gain(self, config: TrainConfig) -> float:
        """What training it now stands to gain: its drift times the weight of samples not trained yet and
        not fit (plus one, so a lineage replaying samples it has seen still counts)."""
        return self.drift.ratio * (1.0 + self.replay.unlearned_weight(config.converged_loss))

    def is_busy(self, on_learner_too: bool = False) -> bool:
        """Whether it must stay in memory: its learner is on the model (unless `on_learner_too`), loss
        passes or an evaluation wait."""
        return (self.on_learner and not on_learner_too) or self.num_queued_passes > 0 or self.gate.is_pending

    def touch(self) -> None:
        self.last_used_s = time.monotonic()


def checkpoint_state(lineage: Lineage, learner: Learner) -> LearnerState | None:
    """The state a checkpoint of `lineage` saves: the model's learner if it is on it, else its parked one."""
    return learner.capture() if lineage.on_learner else lineage.parked


def journal_filter(tenant: str, config: TrainConfig) -> str | None:
    """Which journal rows a lineage reads: its tenant's, or everyone's under shared tenancy."""
    return tenant if config.tenancy == "per_tenant" else None


def lineage_of(tenant: str | None, config: TrainConfig) -> str:
    """The lineage a tenant's requests and samples use."""
    return (tenant or SHARED) if config.tenancy == "per_tenant" else SHARED

