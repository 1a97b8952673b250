"""Continual fine-tuning on the engine thread: intake scoring, sample choice, micro-steps, the
publish gate, adapter versions and checkpoints.

All model work is staged (train/work.py): the scheduler reads the stages waiting (upkeep first:
scoring new samples and evaluating the publish gate; then the open micro-step's layer stages) and
plans a prefix of them; the runner calls `run_work` with that prefix; the engine calls `after_step`
at each step boundary, where finished micro-steps are accounted and the optimizer steps.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
import torch

from mace.config import MaceConfig
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.journal import Journal, StoredSample
from mace.train.layered import LayeredLoss, LayeredMicroStep, loss_stages
from mace.train.learner import CANDIDATE, LEARNER, Learner, save_adapter
from mace.train.policy import RetrainPolicy, make_policy
from mace.train.rehearsal import AnchorStore
from mace.train.replay import DriftSignal, ReplayBuffer, TrainSample, recency_weighted_mean, supersedes
from mace.train.upkeep import PublishGate, Upkeep
from mace.train.work import StageKind, TrainStage, TrainWork

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


class Trainer:
    def __init__(self, causal_lm: Any, tokenizer: Any, journal: Journal, config: MaceConfig) -> None:
        self.config = config.train
        self.tokenizer = tokenizer
        self.journal = journal
        self.policy: RetrainPolicy = make_policy(config.train)
        # Filled by the engine's warm-up at the first start of a model (engine/warmup.py), cached after.
        self.anchors = AnchorStore(config.data_dir / "rehearsal.json",
                                   f"{config.model.name}:{next(causal_lm.parameters()).dtype}")
        self._rehearse = config.train.rehearsal
        self._next_anchor = 0
        self.learner = Learner(causal_lm, config.train)
        self.store = AdapterStore(config.data_dir / "adapters")
        self.checkpoint_path = config.data_dir / "checkpoints" / "learner.pt"
        self.replay = ReplayBuffer(config.train.replay_window, config.train.freshness_half_life_s)
        self.heldout: list[TrainSample] = []
        self.drift = DriftSignal(loss_floor=config.train.converged_loss)
        self.active_version = 0
        self.publishing_held = False  # an operator chose a version by hand: keep it until they choose the newest
        self.num_new_samples = 0
        self.train_tokens_total = 0
        self.train_seconds_total = 0.0
        self.learner_loss = math.nan
        self.serving_heldout_loss = math.nan
        self.learner_heldout_loss = math.nan
        self.last_publish_s = time.monotonic()
        self._last_checkpoint_s = time.monotonic()
        self._last_seen_id = 0
        self._upkeep: deque[Upkeep] = deque()
        self._finished_upkeep: list[Upkeep] = []  # completed at the next step boundary, in order
        self._job: LayeredMicroStep | None = None
        self._finished_jobs: list[LayeredMicroStep] = []
        self._warm_up_job: LayeredMicroStep | None = None
        self._gate_pending = False
        self._serving_losses: dict[int, float] = {}  # held-out sample id -> loss under `_serving_losses_version`
        self._serving_losses_version = -1
        self._unscored: list[TrainSample] = []  # training samples a restart found never scored
        self._restore()

    # ---- what the scheduler reads ----

    @property
    def num_trainable(self) -> int:
        return len(self.replay)

    def drift_ratio(self) -> float:
        return self.drift.ratio

    def upkeep_stages(self) -> list[TrainStage]:
        return [stage for item in self._upkeep for stage in item.stages]

    def job_stages(self, max_job_tokens: int) -> list[TrainStage]:
        if self._job is None and self._finished_jobs:
            return []  # the optimizer may have to step on the finished one before more gradients accumulate
        if self._job is None:
            room = self.config.batch_size - self.learner.num_accumulated  # a micro-step never spans two batches
            chunk = self.replay.pick(max_job_tokens, time.time(), max(1, room), at_least_one=True)
            if chunk is None:
                return []
            self._job = self.learner.micro_step([*chunk.samples, *self._rehearsal()])
        return self._job.remaining

    def _rehearsal(self) -> list[TrainSample]:
        """One anchor with the first micro-step of each optimizer step (train/rehearsal.py)."""
        anchors = self.anchors.samples
        if not self._rehearse or not anchors or self.learner.num_accumulated > 0:
            return []
        anchor = anchors[self._next_anchor % len(anchors)]
        self._next_anchor += 1
        return [anchor]

    def open_warm_up_job(self, samples: list[TrainSample]) -> None:
        """Open a micro-step on synthetic samples whose gradients are thrown away when it is done: it
        lets warm-up measure training's stages on this machine before users' steps plan with them."""
        assert self._job is None and not self._finished_jobs, "warm-up runs before any training"
        self._job = self._warm_up_job = self.learner.micro_step(samples)

    @property
    def is_warming_up(self) -> bool:
        return self._warm_up_job is not None

    # ---- intake ----

    def ingest(self) -> int:
        """Tokenize samples journaled since the last call and queue their scoring; returns how many.

        Samples a restart found unscored in the journal's window are queued first.
        """
        unscored, self._unscored = self._unscored, []
        for sample in unscored:
            self._queue_loss(sample, None, partial(self._score, sample, False))
        num_new = 0
        while stored := self.journal.since(self._last_seen_id):
            for row in stored:
                sample = self._sample(row)
                self._queue_loss(sample, None, partial(self._score, sample, row.held_out))
                self._last_seen_id = row.sample_id
            num_new += len(stored)
        self.num_new_samples += num_new
        return num_new + len(unscored)

    def _sample(self, row: StoredSample) -> TrainSample:
        sample = self._tokenize(row.sample_id, row.prompt, row.completion, row.created_at, row.weight)
        sample.num_trained = row.num_trained
        return sample

    def _tokenize(self, sample_id: int, prompt: str, completion: str, created_at: float, weight: float) -> TrainSample:
        max_tokens = self.config.max_sample_tokens
        answer_ids = [*self.tokenizer.encode(completion, add_special_tokens=False), self.tokenizer.eos_token_id]
        answer_ids = answer_ids[: max_tokens - 1]
        # An over-long sample loses the start of its prompt, never its answer (the part that is learned).
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(max_tokens - len(answer_ids)) :]
        return TrainSample(sample_id, prompt_ids + answer_ids, len(prompt_ids), created_at, weight)

    def _queue_loss(self, sample: TrainSample, adapter: str | None, finish: Callable[[float], None]) -> None:
        """Queue `sample`'s loss under `adapter` as upkeep stages (None: the version serving when it starts)."""
        def begin() -> LayeredLoss:
            return self.learner.loss_pass(sample, adapter or self.learner.adapter_for(self.active_version))

        self._upkeep.append(Upkeep(loss_stages(sample, self.learner.num_layers), begin, finish))

    def _score(self, sample: TrainSample, held_out: bool, loss: float) -> None:
        """A sample's value: its loss under the version users are served now."""
        sample.loss = loss
        self.drift.observe(sample.loss)
        # The gate must not judge a version on an answer the user has since corrected (ReplayBuffer.add).
        self.heldout = [older for older in self.heldout if not supersedes(sample, older)]
        if held_out:
            self.heldout = [*self.heldout[-self.config.heldout_size :], sample]
        elif sample.num_trained == 0 or len(self.replay) < self.config.replay_window:
            self.replay.add(sample)

    # ---- training, on the engine thread ----

    def run_work(self, work: TrainWork) -> None:
        """Run the planned stages, in order. A failure drops the open micro-step, never the engine."""
        started = time.perf_counter()
        try:
            for stage in work.stages:
                if stage.is_upkeep:
                    self._run_upkeep_stage()
                else:
                    self._run_job_stage()
        except Exception:
            log.exception("training stage failed; the open micro-step and its batch are dropped")
            self._job = self._warm_up_job = None
            self.learner.discard_gradients()
        self.train_seconds_total += time.perf_counter() - started

    def _run_upkeep_stage(self) -> None:
        item = self._upkeep[0]
        item.run_next()
        if not item.stages:
            self._finished_upkeep.append(self._upkeep.popleft())

    def _run_job_stage(self) -> None:
        job = self._job
        assert job is not None, "the plan holds training stages but no micro-step is open"
        job.run_next()
        if job.is_done:
            self._finished_jobs.append(job)
            self._job = None

    def after_step(self) -> None:
        finished, self._finished_upkeep = self._finished_upkeep, []
        for item in finished:
            item.complete()
        while self._finished_jobs and self._finished_jobs[0].is_settled:
            job = self._finished_jobs.pop(0)
            if job is self._warm_up_job:
                self._warm_up_job = None
                self.learner.discard_gradients()
            else:
                self._account(job)
        if time.monotonic() - self._last_checkpoint_s > self.config.checkpoint_interval_s:
            self.checkpoint()

    def _account(self, job: LayeredMicroStep) -> None:
        users = [(s, loss) for s, loss in zip(job.samples, job.losses, strict=True) if s.sample_id > 0]
        for sample, loss in users:
            sample.loss = loss if math.isfinite(loss) else sample.loss
            self.drift.on_trained(loss, sample.num_trained)
            sample.num_trained += 1
        finite = [loss for _, loss in users if math.isfinite(loss)]
        if finite:
            self.learner_loss = sum(finite) / len(finite)
        self.train_tokens_total += sum(sample.num_tokens for sample in job.samples)
        self.journal.mark_trained([s.sample_id for s, _ in users], self._last_seen_id, [s.loss for s, _ in users])
        self.learner.accumulated(len(users))  # an anchor rides along; the batch counts users' samples
        if self.learner.batch_ready():
            if self.learner.optimizer_step():
                self._queue_publish_gate()
            self.policy.on_optimizer_step(time.monotonic())

    # ---- publishing ----

    def _queue_publish_gate(self) -> None:
        """Freeze the learner as the candidate and queue its held-out evaluation (upkeep stages)."""
        heldout = self.heldout[-self.config.heldout_size :]
        since_publish_s = time.monotonic() - self.last_publish_s
        if self._gate_pending or not heldout or self.publishing_held:
            return
        if since_publish_s < self.config.min_publish_interval_s:
            return
        if self._serving_losses_version != self.active_version:
            self._serving_losses, self._serving_losses_version = {}, self.active_version
        # Training goes on during the evaluation; the gate judges, and publishes, this snapshot.
        self.learner.snapshot_candidate()
        gate = PublishGate(heldout, self.active_version)
        serving = self.learner.adapter_for(self.active_version)
        for sample in heldout:
            self._queue_loss(sample, CANDIDATE, partial(gate.learner_losses.__setitem__, sample.sample_id))
            if sample.sample_id not in self._serving_losses:
                self._queue_loss(sample, serving, partial(self._serving_losses.__setitem__, sample.sample_id))
        self._upkeep.append(Upkeep([TrainStage(StageKind.HEAD, 0, is_upkeep=True)], None,
                                    lambda _: self._decide_publish(gate)))
        self._gate_pending = True

    def _decide_publish(self, gate: PublishGate) -> None:
        self._gate_pending = False
        if gate.serving_version != self.active_version or self.publishing_held:
            return  # an operator chose a version meanwhile
        half_life = self.config.heldout_half_life
        learner = recency_weighted_mean([gate.learner_losses[s.sample_id] for s in gate.samples], half_life)
        serving = recency_weighted_mean([self._serving_losses[s.sample_id] for s in gate.samples], half_life)
        self.learner_heldout_loss, self.serving_heldout_loss = learner, serving
        if not (math.isfinite(learner) and math.isfinite(serving)):
            return
        self.drift.on_evaluation(serving, learner)
        better = learner < serving * (1.0 - self.config.publish_margin)
        stale = time.monotonic() - self.last_publish_s > self.config.max_staleness_s and learner <= serving
        if not (better or stale):
            log.info("publish gate held the learner back", serving_loss=round(serving, 4),
                     learner_loss=round(learner, 4), drift=round(self.drift.ratio, 3))
        if better or stale:
            self.publish(serving, learner, "better on held-out" if better else "stale, no worse", source=CANDIDATE)

    def publish(self, serving_loss: float, learner_loss: float, reason: str, source: str = LEARNER) -> int:
        version = self.store.next_version()
        self.learner.publish(version, source)
        meta = AdapterVersion(version, self.store.now(), serving_loss, learner_loss,
                              self.learner.num_optimizer_steps, reason)
        weights, lora_config = self.learner.version_weights(version), self.learner.lora_config
        self.store.write(meta, lambda directory: save_adapter(directory, weights, lora_config))
        self.store.set_active(version)
        self.active_version = version
        self.serving_heldout_loss = learner_loss  # what the gate measured is what serves now
        self.last_publish_s = time.monotonic()
        self.drift.on_publish(serving_loss, learner_loss)
        self.num_new_samples = 0
        log.info("adapter published", version=version, serving_loss=serving_loss, learner_loss=learner_loss,
                 reason=reason)
        return version

    def activate(self, version: int) -> None:
        if version != 0 and version not in self.learner.loaded_versions:
            self.store.flush()  # a version published moments ago may still be on its way to disk
            self.learner.load_version(version, self.store.path(version))
        self.store.set_active(version)
        if version != self.active_version:  # its loss on the slice is not known until the next gate
            self.active_version, self.serving_heldout_loss = version, math.nan
        self.publishing_held = version != max((v.version for v in self.store.versions()), default=0)

    def release_versions(self, in_use: set[int]) -> None:
        """Unload old versions no request is pinned to, keeping the newest few loaded."""
        keep = sorted(self.learner.loaded_versions)[-self.config.max_versions_loaded :]
        for version in list(self.learner.loaded_versions):
            if version not in keep and version not in in_use and version != self.active_version:
                self.learner.unload_version(version)

    # ---- checkpoints ----

    def checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({**self.learner.state_dict(), "cursor": self._last_seen_id}, tmp)
        os.replace(tmp, self.checkpoint_path)
        self._last_checkpoint_s = time.monotonic()

    def close(self) -> None:
        """Checkpoint, and wait for adapter versions still being written."""
        self.checkpoint()
        self.store.close()

    def _restore(self) -> None:
        active = self.store.active()
        if active and self.store.exists(active):
            self.activate(active)
            self.last_publish_s = time.monotonic()
            meta = next((v for v in self.store.versions() if v.version == active), None)
            if meta is not None and meta.serving_loss is not None and meta.learner_loss is not None:
                self.drift.on_publish(meta.serving_loss, meta.learner_loss)  # the reference it was published with
        if self.checkpoint_path.is_file():
            state = torch.load(self.checkpoint_path, weights_only=True)
            self.learner.load_state_dict(state)
        self._resume_from_journal()

    def _resume_from_journal(self) -> None:
        """Rebuild replay and the held-out slice from the journal's recent window, as a trainer that
        never stopped would hold them. Samples trained before keep their stored loss, so only those
        never trained (acknowledged, then a crash) cost a scoring pass, queued by the first `ingest`;
        held-out samples need none (the publish gate measures its own losses).

        A journal of any length costs the same: older samples had left the windows anyway.
        """
        rows = self.journal.window(self.config.replay_window, self.config.heldout_size)
        samples = [(row, self._sample(row)) for row in rows]
        newest = {sample.prompt_key: sample for _, sample in samples}
        for row, sample in samples:
            if supersedes(newest[sample.prompt_key], sample):
                continue  # the user answered this prompt differently later
            if row.held_out:
                self._score(sample, held_out=True, loss=math.nan)
            elif row.loss is None:
                self._unscored.append(sample)
            else:
                self._score(sample, held_out=False, loss=row.loss)
        self._last_seen_id = self.journal.last_id()

    def stats(self) -> TrainStats:
        return TrainStats(
            policy=self.policy.name, active_version=self.active_version,
            num_optimizer_steps=self.learner.num_optimizer_steps, num_skipped_steps=self.learner.num_skipped_steps,
            train_tokens_total=self.train_tokens_total, train_seconds_total=self.train_seconds_total,
            learner_loss=self.learner_loss, serving_heldout_loss=self.serving_heldout_loss,
            learner_heldout_loss=self.learner_heldout_loss, drift=self.drift.ratio,
            seconds_since_publish=time.monotonic() - self.last_publish_s, num_trainable=self.num_trainable,
        )
