"""Continual fine-tuning on the engine thread: the parts put together.

    intake.py        journal -> tokenized samples, the held-out slice, the cursor
    tasks.py         loss passes and micro-steps, staged; their typed results
    publish_gate.py  candidate, held-out evaluation, decision, adapter versions
    drift.py         how far the served model is from its users' data
    checkpoint.py    the learner's checkpoint
    writer.py        the disk writes, on one thread off the engine thread

The scheduler reads the stages waiting (`upkeep_stages`, then `job_stages`) and plans a prefix of
them; the runner calls `run_work` with that plan, which runs exactly those stages, matched by id;
the engine calls `after_step` at each step boundary, where results are read, finished micro-steps
are accounted and the optimizer steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import structlog

from mace.config import MaceConfig
from mace.train.adapters import AdapterStore
from mace.train.checkpoint import Checkpoints
from mace.train.drift import DriftSignal
from mace.train.intake import Intake
from mace.train.journal import Journal
from mace.train.layered import LayeredLoss
from mace.train.learner import Learner
from mace.train.policy import RetrainPolicy, make_policy
from mace.train.publish_gate import AdapterCatalog, PublishGate
from mace.train.rehearsal import AnchorStore
from mace.train.replay import ReplayBuffer, TrainSample
from mace.train.tasks import LossPurpose, LossRequest, LossResult, MicroStepTask, TaskQueue
from mace.train.work import TrainStage, TrainWork
from mace.train.writer import DiskWriter

log = structlog.get_logger(__name__)


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


class Trainer:
    def __init__(self, causal_lm: Any, tokenizer: Any, journal: Journal, config: MaceConfig) -> None:
        self.config = config.train
        self.journal = journal
        self.policy: RetrainPolicy = make_policy(config.train)
        # Filled by the engine's warm-up at the first start of a model (engine/warmup.py), cached after.
        self.anchors = AnchorStore(config.data_dir / "rehearsal.json",
                                   f"{config.model.name}:{next(causal_lm.parameters()).dtype}")
        self._next_anchor = 0
        self.learner = Learner(causal_lm, config.train)
        self.writer = DiskWriter()
        self.store = AdapterStore(config.data_dir / "adapters", self.writer)
        self.checkpoints = Checkpoints(config.data_dir / "checkpoints" / "learner.pt", self.writer)
        self.replay = ReplayBuffer(config.train.replay_window, config.train.freshness_half_life_s)
        self.drift = DriftSignal(loss_floor=config.train.converged_loss)
        self.intake = Intake(tokenizer, journal, config.train, self.replay, self.drift)
        self.gate = PublishGate(self.learner, self.store, self.drift, config.train)
        self.tasks = TaskQueue(self.learner.num_layers, self._begin_loss)
        self.train_tokens_total = 0
        self.train_seconds_total = 0.0
        self.learner_loss = math.nan
        self.gate.restore()
        self.checkpoints.restore(self.learner)
        self.intake.resume()

    # ---- what the scheduler reads ----

    @property
    def num_trainable(self) -> int:
        return len(self.replay)

    @property
    def num_samples_read(self) -> int:
        return self.intake.num_samples_read

    @property
    def is_converged(self) -> bool:
        """Whether training has nothing left to gain from the samples it has: the learner fits every one
        (loss under `converged_loss`), or the publish gate held it back `rest_after_held_back` times in
        a row with no new sample meanwhile. More steps would only overfit them at the cost of what the
        model knew, so `mace` rests until new feedback arrives."""
        plateau = self.gate.num_held_back >= self.config.rest_after_held_back
        return plateau or self.replay.all_fit(self.config.converged_loss)

    @property
    def active_version(self) -> int:
        return self.gate.active_version

    def drift_ratio(self) -> float:
        return self.drift.ratio

    def upkeep_stages(self) -> list[TrainStage]:
        """Forward-only work waiting. The publish gate opens here when it is due (new optimizer steps,
        `min_publish_interval_s` passed): the planner asks every step, and an idle engine every wake,
        so the learner's last steps before it rests are judged too."""
        if self.gate.is_due():
            for request in self.gate.open(self.intake.gate_slice()):
                self.tasks.queue_loss(request)
        return self.tasks.upkeep_stages()

    def job_stages(self, max_job_tokens: int) -> list[TrainStage]:
        if self.tasks.job is None and self.tasks.finished_jobs:
            return []  # the optimizer may have to step on the finished one before more gradients accumulate
        if self.tasks.job is None:
            room = self.config.batch_size - self.learner.num_accumulated  # a micro-step never spans two batches
            batch = self.replay.pick(max_job_tokens, time.time(), max(1, room), at_least_one=True)
            if batch is None:
                return []
            self.tasks.open_job(self.learner.micro_step([*batch.samples, *self._rehearsal()]))
        return self.tasks.job_stages()

    def _rehearsal(self) -> list[TrainSample]:
        """One anchor with the first micro-step of each optimizer step (train/rehearsal.py)."""
        anchors = self.anchors.samples
        if not self.config.rehearsal or not anchors or self.learner.num_accumulated > 0:
            return []
        anchor = anchors[self._next_anchor % len(anchors)]
        self._next_anchor += 1
        return [anchor]

    def open_warm_up_job(self, samples: list[TrainSample]) -> None:
        """Open a micro-step on synthetic samples whose gradients are thrown away when it is done: it
        lets warm-up measure training's stages on this machine before users' steps plan with them."""
        assert self.tasks.job is None and not self.tasks.finished_jobs, "warm-up runs before any training"
        self.tasks.open_job(self.learner.micro_step(samples), warm_up=True)

    @property
    def is_warming_up(self) -> bool:
        return self.tasks.is_warming_up

    # ---- on the engine thread ----

    def ingest(self) -> int:
        """Read samples journaled since the last call and queue their scoring; returns how many."""
        found = self.intake.read_new()
        if found:
            self.gate.num_held_back = 0  # a plateau on the old samples says nothing of new ones
        for new in found:
            self.tasks.queue_loss(LossRequest(new.sample, LossPurpose.SCORE, held_out=new.held_out))
        return len(found)

    def _begin_loss(self, request: LossRequest) -> LayeredLoss:
        adapter = request.adapter or self.learner.adapter_for(self.gate.active_version)
        return self.learner.loss_pass(request.sample, adapter)

    def run_work(self, work: TrainWork) -> None:
        """Run the planned stages, in order. A failure drops the open micro-step, never the engine."""
        started = time.perf_counter()
        try:
            for stage in work.stages:
                self.tasks.run(stage)
        except Exception:
            log.exception("training stage failed; the open micro-step and its batch are dropped")
            self.tasks.drop_job()
            self.learner.discard_gradients()
        self.train_seconds_total += time.perf_counter() - started

    def after_step(self) -> None:
        for result in self.tasks.take_results():
            self._on_loss(result)
        for job in self.tasks.take_settled_jobs():
            if job.warm_up:
                self.learner.discard_gradients()
            else:
                self._account(job)
        if time.monotonic() - self.checkpoints.last_saved_s > self.config.checkpoint_interval_s:
            self.checkpoint()

    def _on_loss(self, result: LossResult) -> None:
        request = result.request
        if request.purpose is LossPurpose.SCORE:
            self.intake.accept(request.sample, request.held_out, result.loss)
        else:
            self.gate.record(result)

    def _account(self, job: MicroStepTask) -> None:
        step = job.step
        users = [(s, loss) for s, loss in zip(step.samples, step.losses, strict=True) if s.sample_id > 0]
        for sample, loss in users:
            sample.loss = loss if math.isfinite(loss) else sample.loss
            self.drift.on_trained(loss, sample.num_trained)
            sample.num_trained += 1
        finite = [loss for _, loss in users if math.isfinite(loss)]
        if finite:
            self.learner_loss = sum(finite) / len(finite)
        self.train_tokens_total += sum(sample.num_tokens for sample in step.samples)
        ids, losses, cursor = [s.sample_id for s, _ in users], [s.loss for s, _ in users], self.intake.cursor
        self.writer.submit(lambda: self.journal.mark_trained(ids, cursor, losses))
        self.learner.accumulated(len(users))  # an anchor rides along; the batch counts users' samples
        if self.learner.batch_ready():
            self.learner.optimizer_step()
            self.policy.on_optimizer_step(time.monotonic())

    # ---- versions, on the engine thread ----

    def activate(self, version: int) -> None:
        self.gate.activate(version)

    def release_versions(self, in_use: set[int]) -> None:
        self.gate.release_versions(in_use)

    def adapters(self) -> AdapterCatalog:
        """The published versions; safe to call from any thread."""
        return self.gate.catalog()

    # ---- disk ----

    def checkpoint(self) -> None:
        self.checkpoints.save(self.learner, self.intake.cursor)

    def flush(self) -> None:
        """Wait until every write queued so far (journal marks, versions, checkpoints) has landed."""
        self.writer.flush()

    def close(self) -> None:
        """Checkpoint, and wait for every write still queued."""
        self.checkpoint()
        self.writer.close()

    def stats(self) -> TrainStats:
        gate = self.gate
        return TrainStats(
            policy=self.policy.name, active_version=gate.active_version,
            num_optimizer_steps=self.learner.num_optimizer_steps, num_skipped_steps=self.learner.num_skipped_steps,
            train_tokens_total=self.train_tokens_total, train_seconds_total=self.train_seconds_total,
            learner_loss=self.learner_loss, serving_heldout_loss=gate.serving_heldout_loss,
            learner_heldout_loss=gate.learner_heldout_loss, drift=self.drift.ratio,
            seconds_since_publish=time.monotonic() - gate.last_publish_s, num_trainable=self.num_trainable,
            is_converged=self.is_converged, judged_on_heldout=gate.judged_on_heldout,
        )
