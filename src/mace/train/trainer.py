"""Continual fine-tuning on the engine thread: the parts put together.

    intake.py        journal -> tokenized samples, the held-out slice, the cursor
    lineage.py       one tenant's learning: samples, drift, publish gate, versions, parked learner
    residency.py     which lineages are in memory; followers of lineages another server owns
    tasks.py         loss passes and micro-steps, staged; their typed results
    publish_gate.py  candidate, held-out evaluation, decision, adapter versions
    drift.py         how far the served model is from its users' data
    checkpoint.py    the learner's checkpoint
    writer.py        the disk writes, on one thread off the engine thread

The scheduler reads the stages waiting (`upkeep_stages`, then `job_stages`) and plans a prefix of
them; the runner calls `run_work` with that plan, which runs exactly those stages, matched by id;
the engine calls `after_step` at each step boundary, where results are read, finished micro-steps
are accounted and the optimizer steps.

Tenants: every lineage (one per tenant under `train.tenancy = "per_tenant"`, the shared one for
requests without a tenant) learns from its own samples only. The learner is lent to one lineage per
optimizer step, chosen by expected gain with a floor (`fair_share.py`); gates open one at a time;
lineages past `max_resident_tenants` go to disk, least recently used first, and come back off the
engine thread (`request_lineage`, `install`).

Servers sharing one data dir (replicas on one adapter store): each lineage is trained by the server
holding its lease (train/lease.py) and followed by the others, which serve the versions it publishes
(train/follow.py) and take it over when its owner is gone. The journal is shared (SQLite, WAL): every
server reads every sample and scores those of the lineages it owns.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from mace.config import MaceConfig
from mace.tenancy import SHARED
from mace.train import fair_share
from mace.train.adapters import AdapterStore
from mace.train.checkpoint import Checkpoints
from mace.train.drift import DriftSignal
from mace.train.follow import FollowerSync
from mace.train.intake import Intake, NewTrainSample, SampleReader
from mace.train.journal import Journal
from mace.train.layered import MAX_PASS_TOKENS, LayeredLoss
from mace.train.learner import AdapterKey, Learner
from mace.train.lease import OwnedElsewhere, holder
from mace.train.lineage import Lineage, LineageFiles, checkpoint_state
from mace.train.policy import RetrainPolicy, make_policy
from mace.train.publish_gate import AdapterCatalog, GateShare, PublishGate
from mace.train.rehearsal import AnchorStore, anchor_prompts
from mace.train.replay import ReplayBuffer, TrainSample
from mace.train.residency import Residency
from mace.train.scope import PromptStatistics, prompt_words
from mace.train.stats import MAX_TENANTS_LISTED, TenantStats, TrainStats
from mace.train.tasks import LossPurpose, LossRequest, LossResult, MicroStepTask, TaskQueue
from mace.train.work import TrainStage, TrainWork
from mace.train.writer import DiskWriter

log = structlog.get_logger(__name__)


class Trainer(Residency):
    def __init__(self, causal_lm: Any, tokenizer: Any, journal: Journal, config: MaceConfig) -> None:
        self.mace_config = config
        self.config = config.train
        self.journal = journal
        self.policy: RetrainPolicy = make_policy(config.train)
        # Filled by the engine's warm-up at the first start of a model (engine/warmup.py), cached after.
        self.anchors = AnchorStore(config.data_dir / "rehearsal.json",
                                   f"{config.model.name}:{next(causal_lm.parameters()).dtype}")
        self._next_anchor = 0
        # Each anchor question's words (by question index): what the scope reads of it (`anchors_in_scope`).
        self.anchor_words = [prompt_words(tokenizer.decode(prompt)) for prompt in anchor_prompts(tokenizer)]
        # Which words say something about a prompt's topic: counted over the prompts served, from the
        # anchors' general questions on, so the chat template's words weigh nothing from the first request.
        self.prompt_statistics = PromptStatistics(self.anchor_words)
        self.learner = Learner(causal_lm, config.train)
        self.writer = DiskWriter()
        self.reader = SampleReader(tokenizer, journal, config.train)
        self.tasks = TaskQueue(self.learner.num_layers, self._begin_loss)
        self.train_tokens_total = 0
        self.train_seconds_total = 0.0
        self.lineages: dict[str, Lineage] = {}
        self.gate_share = GateShare()  # every lineage's gate draws on the machine's one share of training time
        self._tenants_seen: set[str] = set()
        self._lock = threading.Lock()  # `_loading` and `_evictions` are read from the event loop
        self._loading: dict[str, concurrent.futures.Future[LineageFiles]] = {}
        self._evictions: dict[str, int] = {}
        self._waiting: dict[str, list[NewTrainSample]] = {}  # samples of lineages on their way back
        # Lineages evicted since the start, as they were when they left (their training time carries on
        # when they come back; stats list them with their active version, not as new).
        self._gone: dict[str, TenantStats] = {}
        # Tenants on disk with samples never trained (a restart past the resident bound): brought back
        # when there is room, each once per newest untrained sample (`bring_back_pending`).
        self._pending_scan: concurrent.futures.Future[list[tuple[str, int]]] | None = None
        self._pending_scanned_s = time.monotonic()
        self._brought_back_at: dict[str, int] = {}
        # Called (on the writer thread) when a lineage has been read: the engine sends itself an Ingest,
        # so an idle engine wakes to install it and score its samples.
        self.on_lineage_read: Callable[[], None] = lambda: None
        self._followers = FollowerSync(self.writer, config.data_dir, lambda: self.on_lineage_read())
        self._journal_polled_s = time.monotonic()
        self.reader.start()
        # Their samples never trained are scored from the first `ingest` (AsyncEngine.start), after warm-up.
        self.focus = self.install(self.read_files(SHARED), score_now=False)
        self.focus.on_learner = True
        self.learner.unpark(self.focus.parked)
        self.focus.parked = None
        if self.config.tenancy == "per_tenant":  # a restart trains what was acknowledged, not trained
            for tenant, newest in journal.tenants_with_pending(self.config.max_resident_tenants):
                if tenant != SHARED:
                    self.install(self.read_files(tenant), score_now=False)
                    self._brought_back_at[tenant] = newest

    # ---- the shared lineage, as a server without tenants has it ----

    @property
    def shared(self) -> Lineage:
        return self.lineages[SHARED]

    @property
    def intake(self) -> Intake:
        return self.shared.intake

    @property
    def replay(self) -> ReplayBuffer:
        return self.shared.replay

    @property
    def drift(self) -> DriftSignal:
        return self.shared.drift

    @property
    def gate(self) -> PublishGate:
        return self.shared.gate

    @property
    def store(self) -> AdapterStore:
        return self.shared.store

    @property
    def checkpoints(self) -> Checkpoints:
        return self.shared.checkpoints

    @property
    def active_version(self) -> int:
        return self.shared.active_version

    # ---- what the scheduler reads ----

    @property
    def num_trainable(self) -> int:
        return sum(len(lineage.replay) for lineage in self.lineages.values())

    @property
    def num_samples_read(self) -> int:
        return sum(lineage.intake.num_samples_read for lineage in self.lineages.values())

    @property
    def is_converged(self) -> bool:
        """Whether training has nothing left to gain from the samples it has: in every lineage with
        samples, the learner fits every one (loss under `converged_loss`), or the publish gate held it
        back `rest_after_held_back` times in a row with no new sample meanwhile. More steps would only
        overfit them at the cost of what the model knew, so `mace` rests until new feedback arrives."""
        learning = [lineage for lineage in self.lineages.values() if len(lineage.replay) or lineage.gate.num_held_back]
        return bool(learning) and all(lineage.is_converged(self.config) for lineage in learning)

    def drift_ratio(self) -> float:
        """The drift of the lineage training serves next (the one on the learner until it switches); 1.0
        (aligned) between optimizer steps when no lineage wants training (`fair_share.wants_training`)."""
        if self.learner.num_accumulated > 0:
            return self.focus.drift.ratio
        chosen = fair_share.choose(self.lineages.values(), self.focus, self.config)
        return 1.0 if chosen is None else chosen.drift.ratio

    def upkeep_stages(self) -> list[TrainStage]:
        """Forward-only work waiting. A publish gate opens here when it is due (new optimizer steps,
        `min_publish_interval_s` passed, its passes within their share of training's time), one
        lineage's at a time (one candidate adapter): the planner asks every step, and an idle engine
        every wake, so a learner's last steps before it rests, or before the learner moves to another
        lineage, are judged too."""
        if not any(lineage.gate.is_pending for lineage in self.lineages.values()):
            # A lineage that rests has nothing more coming: its last steps are judged now, whatever the
            # gates' share. The share grows with training's seconds, so once most tenants rest it grows
            # slowly, and a resting tenant's last steps could wait minutes to be published.
            # Whether it rests is asked only of lineages due but for the share (it reads every sample).
            due = [lineage for lineage in self.lineages.values()
                   if lineage.is_owned and lineage.gate.is_due(paced=False)]
            for lineage in sorted(due, key=lambda lineage: lineage.gate.last_publish_s):
                paced = not lineage.is_converged(self.config)
                if lineage.gate.is_due(paced):
                    for request in lineage.gate.open(lineage.intake.gate_slice(), paced):
                        self._queue_loss(lineage, request)
                    break
        return self.tasks.upkeep_stages()

    def job_stages(self, max_job_tokens: int, max_pass_tokens: int = MAX_PASS_TOKENS) -> list[TrainStage]:
        if self.tasks.job is None and self.tasks.finished_jobs:
            return []  # the optimizer may have to step on the finished one before more gradients accumulate
        if self.tasks.job is None:
            if self.learner.num_accumulated == 0:  # the learner moves only between optimizer steps
                chosen = fair_share.choose(self.lineages.values(), self.focus, self.config)
                self._lend_learner(chosen or self.focus)
            room = self.config.batch_size - self.learner.num_accumulated  # a micro-step never spans two batches
            batch = self.focus.replay.pick(max_job_tokens, time.time(), max(1, room), at_least_one=True)
            if batch is None:
                return []
            self.focus.touch()
            self.tasks.open_job(self.learner.micro_step([*batch.samples, *self._rehearsal()], max_pass_tokens))
        return self.tasks.job_stages()

    def _lend_learner(self, lineage: Lineage) -> None:
        """Put `lineage`'s learner on the model (between optimizer steps: no gradient is half-accumulated)."""
        if lineage is self.focus:
            return
        self.focus.parked, self.focus.on_learner = self.learner.park(), False
        self.learner.unpark(lineage.parked)
        lineage.parked, lineage.on_learner = None, True
        self.focus = lineage

    def _learner_is_free(self) -> bool:
        return self.learner.num_accumulated == 0 and self.tasks.job is None

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
        """Install lineages read back since the last call, read samples journaled since, and queue their
        scoring; returns how many samples."""
        self._install_loaded()
        count = 0
        for lineage in self.lineages.values():
            if not lineage.is_owned:
                continue
            for new in lineage.intake.take_unscored():
                self._score(lineage, new)
                count += 1
        for tenant, new in self.reader.read_new():
            name = self.lineage_of(tenant)
            resident = self.lineages.get(name)
            if resident is not None:
                if resident.is_owned:  # else its owner, reading the same journal, scores it
                    self._score(resident, new)
                else:
                    self._widen_scope(resident, new.sample)
            else:  # its lineage is on disk: the samples wait for it to come back
                self._waiting.setdefault(name, []).append(new)
                self.request_lineage(name)
            count += 1
        return count

    def _score(self, lineage: Lineage, new: NewTrainSample) -> None:
        self._widen_scope(lineage, new.sample)
        lineage.intake.num_samples_read += 1
        lineage.gate.num_held_back = 0  # a plateau on the old samples says nothing of new ones
        lineage.touch()
        self._queue_loss(lineage, LossRequest(new.sample, LossPurpose.SCORE, held_out=new.held_out,
                                              tenant=lineage.tenant))

    def _widen_scope(self, lineage: Lineage, sample: TrainSample) -> None:
        """Its versions will answer prompts like this sample's (train/scope.py)."""
        if self.config.scope_similarity > 0:
            prompt = self.reader.tokenizer.decode(sample.token_ids[: sample.num_prompt_tokens])
            lineage.scope.teach(prompt_words(prompt))

    def _queue_loss(self, lineage: Lineage, request: LossRequest) -> None:
        lineage.num_queued_passes += 1
        self.tasks.queue_loss(request if request.tenant == lineage.tenant
                              else LossRequest(request.sample, request.purpose, request.adapter, request.held_out,
                                               lineage.tenant))

    def _begin_loss(self, request: LossRequest, samples: list[TrainSample]) -> LayeredLoss:
        """One pass for `samples`, whose requests share `request`'s lineage and adapter (`LossTask.can_join`)."""
        lineage = self.lineages[request.tenant]
        adapter = request.adapter or self.learner.adapter_for(lineage.active_version, lineage.tenant)
        return self.learner.loss_pass(samples, adapter)

    def run_work(self, work: TrainWork) -> None:
        """Run the planned stages, in order. A failure drops the open micro-step, never the engine."""
        started = time.perf_counter()
        job = self.tasks.job
        job_s = 0.0
        try:
            for stage in work.stages:
                stage_started = time.perf_counter()
                self.tasks.run(stage)
                if job is not None and stage.task_id == job.task_id:
                    job_s += time.perf_counter() - stage_started
        except Exception:
            log.exception("training stage failed; the open micro-step and its batch are dropped")
            self.tasks.drop_job()
            self.learner.discard_gradients()
        seconds = time.perf_counter() - started
        self.train_seconds_total += seconds
        fair_share.charge(self.focus, job_s)
        self.gate_share.charge_training(job_s)
        if any(lineage.gate.is_pending for lineage in self.lineages.values()):
            self.gate_share.charge_evaluation(seconds - job_s)  # one at a time: the passes beside the job are its

    def after_step(self) -> None:
        for result in self.tasks.take_results():
            self._on_loss(result)
        for job in self.tasks.take_settled_jobs():
            if job.warm_up:
                self.learner.discard_gradients()
            else:
                self._account(job)
        self._install_loaded()
        self.follow_store()
        if time.monotonic() - self.shared.checkpoints.last_saved_s > self.config.checkpoint_interval_s:
            self.checkpoint()

    def _on_loss(self, result: LossResult) -> None:
        request = result.request
        lineage = self.lineages[request.tenant]  # kept resident while its passes are queued
        lineage.num_queued_passes -= 1
        if request.purpose is LossPurpose.SCORE:
            lineage.intake.accept(request.sample, request.held_out, result.loss)
        else:
            lineage.gate.record(result)
            for follow_up in lineage.gate.take_requests():  # the anchors, once the slice would publish
                self._queue_loss(lineage, follow_up)

    def _account(self, job: MicroStepTask) -> None:
        lineage = self.focus  # the learner moves only between optimizer steps, so the job's lineage is on it
        step = job.step
        users = [(s, loss) for s, loss in zip(step.samples, step.losses, strict=True) if s.sample_id > 0]
        for sample, loss in users:
            sample.loss = loss if math.isfinite(loss) else sample.loss
            lineage.drift.on_trained(loss, sample.num_trained)
            sample.num_trained += 1
        finite = [loss for _, loss in users if math.isfinite(loss)]
        if finite:
            lineage.learner_loss = sum(finite) / len(finite)
        tokens = sum(sample.num_tokens for sample in step.samples)
        self.train_tokens_total += tokens
        lineage.train_tokens_total += tokens
        lineage.changed_since_checkpoint = True
        ids, losses, cursor = [s.sample_id for s, _ in users], [s.loss for s, _ in users], self.reader.cursor
        self.writer.submit(lambda: self.journal.mark_trained(ids, cursor, losses))
        self.learner.accumulated(len(users))  # an anchor rides along; the batch counts users' samples
        if self.learner.batch_ready():
            self.learner.optimizer_step()
            self.policy.on_optimizer_step(time.monotonic())

    # ---- versions, on the engine thread ----

    def activate(self, version: int, tenant: str = SHARED) -> None:
        lineage = self.resident(tenant)
        if not lineage.is_owned:
            raise OwnedElsewhere(f"another server owns this lineage ({holder(lineage.store.root.parent)}); "
                                 "activate the version there")
        lineage.gate.activate(version)

    def release_versions(self, in_use: set[AdapterKey]) -> None:
        """Unload versions no request is pinned to, keeping every resident lineage's active version and
        the shared lineage's newest few; then send idle tenants past the bound to disk."""
        self._evict(in_use)
        self.bring_back_pending({tenant for tenant, _ in in_use})
        shared_newest = sorted(self.shared.gate.learner.loaded_versions)[-self.config.max_versions_loaded :]
        keep = {*in_use, *((SHARED, version) for version in shared_newest),
                *((lineage.tenant, lineage.active_version) for lineage in self.lineages.values())}
        for tenant, version in self.learner.loaded_keys - keep:
            self.learner.unload_version(version, tenant)

    def adapters(self, tenant: str = SHARED) -> AdapterCatalog | None:
        """`tenant`'s published versions, from memory (any thread); None when its lineage is on disk."""
        lineage = self.lineages.get(tenant)
        return lineage.gate.catalog() if lineage is not None else None

    def active_versions(self) -> dict[str, int]:
        return {tenant: lineage.active_version for tenant, lineage in list(self.lineages.items())}

    # ---- disk ----

    def checkpoint(self) -> None:
        """Every resident lineage's learner that changed (and the shared one's, always)."""
        for lineage in list(self.lineages.values()):
            if not lineage.is_owned or (lineage.tenant != SHARED and not lineage.changed_since_checkpoint):
                continue
            state = checkpoint_state(lineage, self.learner)
            if state is not None:
                lineage.checkpoints.save(state, self.reader.cursor)
                lineage.changed_since_checkpoint = False

    def flush(self) -> None:
        """Wait until every write queued so far (journal marks, versions, checkpoints) has landed."""
        self.writer.flush()

    def close(self) -> None:
        """Checkpoint, wait for every write still queued, then give the leases up."""
        self.checkpoint()
        self.writer.close()
        for lineage in self.lineages.values():
            if lineage.lease is not None:
                lineage.lease.release()

    def stats(self) -> TrainStats:
        lineages = list(self.lineages.values())
        focus, shared = self.focus, self.shared
        tenants = [self._tenant_stats(lineage) for lineage in lineages if lineage.tenant != SHARED]
        tenants += self._gone.values()
        tenants.sort(key=lambda t: t.train_seconds_total, reverse=True)
        listed, other = tenants[:MAX_TENANTS_LISTED], tenants[MAX_TENANTS_LISTED:]
        return TrainStats(
            policy=self.policy.name, active_version=shared.active_version,
            num_optimizer_steps=sum(lineage.num_optimizer_steps for lineage in lineages),
            num_skipped_steps=sum(lineage.num_skipped_steps for lineage in lineages),
            train_tokens_total=self.train_tokens_total, train_seconds_total=self.train_seconds_total,
            learner_loss=focus.learner_loss, serving_heldout_loss=focus.gate.serving_heldout_loss,
            learner_heldout_loss=focus.gate.learner_heldout_loss, drift=focus.drift.ratio,
            seconds_since_publish=time.monotonic() - max(lineage.gate.last_publish_s for lineage in lineages),
            num_trainable=self.num_trainable, is_converged=self.is_converged,
            judged_on_heldout=focus.gate.judged_on_heldout,
            anchor_loss_rise=focus.gate.anchor_loss_rise,
            num_held_back_forgetting=sum(lineage.gate.num_held_back_forgetting for lineage in lineages),
            num_tenants=len(self._tenants_seen), num_resident_tenants=len(lineages) - 1,
            tenants=tuple(listed), other_tenants_train_seconds=sum(t.train_seconds_total for t in other),
            num_requests_in_scope=sum(lineage.scope.num_in_scope for lineage in lineages),
            num_requests_outside_scope=sum(lineage.scope.num_outside for lineage in lineages),
        )

    def _tenant_stats(self, lineage: Lineage) -> TenantStats:
        return TenantStats(lineage.tenant, lineage.active_version, lineage.num_optimizer_steps,
                           lineage.train_seconds_total, lineage.train_tokens_total, lineage.drift.ratio,
                           len(lineage.replay), lineage.is_converged(self.config) or not len(lineage.replay), True,
                           lineage.gate.serving_heldout_loss, lineage.gate.learner_heldout_loss, lineage.is_owned)
