"""`EngineCore`: the engine thread's side. It owns the model, the scheduler and the trainer.

    loop: inbox messages -> step() -> deliver(outputs) -> EngineLoad snapshot
    step: scheduler.schedule() -> runner.run(plan) -> scheduler.update(plan, output)

Nothing here is called from the event loop except through the inbox (`inbox.py`); outputs leave
through `deliver`, which the front end (`frontend.py`) points at the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import structlog

from mace.config import MaceConfig
from mace.engine.inbox import Abort, Activate, AddRequest, EngineMessage, Inbox, Ingest, InstallLineage
from mace.engine.latency import StepShape
from mace.engine.load import EngineLoad
from mace.engine.memory import Memory
from mace.engine.plan import IterationPlan, RunnerOutput
from mace.engine.request import ACTIVE_VERSION, RequestOutput
from mace.engine.runner import ModelRunner
from mace.engine.scheduler import Scheduler
from mace.model.loader import ModelBundle
from mace.train.trainer import Trainer

log = structlog.get_logger(__name__)

IDLE_WAKE_S = 0.5  # an idle engine still wakes this often, so the load snapshot's clocks move


def _drop(outputs: list[RequestOutput]) -> None:
    """Where outputs go until a front end starts the loop (warm-up runs steps without one)."""


class EngineCore:
    def __init__(self, bundle: ModelBundle, config: MaceConfig, trainer: Trainer | None = None) -> None:
        self.bundle = bundle
        self.config = config
        self.runner = ModelRunner(bundle.causal_lm, config.model.max_model_len, bundle.device,
                                  overlap_streams=config.engine.overlap_streams, kv_block_size=config.memory.block_size,
                                  train_thread=config.engine.train_thread, num_threads=config.model.num_threads,
                                  cuda_graphs=config.engine.cuda_graphs, max_num_seqs=config.engine.max_num_seqs)
        self.memory = Memory.build(config, bundle.causal_lm, self.runner.kv_bytes_per_token(), bundle.device)
        self.blocks = self.memory.pool
        # A request that fits alone must always be servable, so the context never exceeds the budget.
        self.max_model_len = min(config.model.max_model_len, bundle.max_position, self.blocks.capacity_tokens)
        self.runner.kv.max_model_len = self.max_model_len
        self.trainer = trainer
        self.runner.trainer = trainer
        if self.memory.pruner is not None:
            self.runner.kv.enable_importance()
        if self.runner.static_decode is not None:  # after the trainer: its adapters are in the graphs
            self.runner.static_decode.capture_all()
        self.scheduler = Scheduler(
            config.engine, self.blocks, slo=config.slo,
            policy=trainer.policy if trainer is not None else None, train_source=trainer,
            prefix_cache=self.memory.prefix_cache, train_memory=self.memory.training, pruner=self.memory.pruner,
        )
        if self.scheduler.training is not None:
            self.scheduler.training.beside_share = self.runner.streams.beside_share
        if trainer is not None:
            trainer.on_lineage_read = lambda: self.inbox.put(Ingest())
        self.adapter_version = trainer.active_version if trainer is not None else 0  # the shared lineage's
        self._active_versions = trainer.active_versions() if trainer is not None else {}
        self.num_steps = 0
        self.last_plan: IterationPlan | None = None
        self.step_time_s_total = 0.0
        self.forward_time_s_total = 0.0
        self.inbox = Inbox()
        self.deliver: Callable[[list[RequestOutput]], None] = _drop
        self.load = self.read_load()

    # ---- the loop ----

    def run_loop(self) -> None:
        while not self.inbox.is_stopping:
            for message in self.inbox.take_all():
                self.handle(message)
            if self.scheduler.has_work:
                self.deliver(self.step())
            else:
                self.release_idle()
                self.inbox.wait(IDLE_WAKE_S)

    def handle(self, message: EngineMessage) -> None:
        if isinstance(message, AddRequest):
            self._pin(message)
            self.scheduler.add_request(message.request)
        elif isinstance(message, Abort):
            output = self.scheduler.abort_request(message.request_id)
            if output is not None:
                self.deliver([output])
        elif isinstance(message, Ingest):
            if self.trainer is not None:
                self.trainer.ingest()
        elif isinstance(message, InstallLineage):
            if self.trainer is not None:
                self.trainer.install(message.files)
        else:
            self._activate(message)

    def _pin(self, message: AddRequest) -> None:
        """A new request runs with its lineage's active version, as it is when the request arrives."""
        request = message.request
        if request.adapter_version != ACTIVE_VERSION:  # chosen by the caller (tests, benchmarks)
            return
        if self.trainer is None:
            request.adapter_version = 0
            return
        try:
            request.adapter_version = self.trainer.pin(request.tenant, request.prompt_words)
        except Exception:  # its lineage's files cannot be read: serve the base model rather than fail
            log.exception("lineage not readable; the request runs on the base model", tenant=request.tenant)
            request.adapter_version = 0

    def _activate(self, message: Activate) -> None:
        try:
            if self.trainer is None:
                raise RuntimeError("no retraining policy is on, so only version 0 exists")
            self.trainer.activate(message.version, message.tenant)
            self.adapter_version = self.trainer.active_version
        except Exception as exc:  # reported to the caller, the engine goes on
            message.reply(exc)
            return
        message.reply(None)

    # ---- steps ----

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        plan = self.last_plan = self.scheduler.schedule()
        margin_s = self.scheduler.latency.error_margin_s  # as planned: finished requests teach the guard below
        output = self._run_guarded(plan)
        outputs = self.scheduler.update(plan, output)
        self._after_step()
        step_time_s = time.perf_counter() - started
        self._account(step_time_s, output)
        if log.is_enabled_for(logging.DEBUG):  # a prediction per step only when someone reads it
            self._log_step(plan.shape, step_time_s, margin_s)
        if output.forward_time_s > 0:
            # The whole iteration, not the forward alone: what a stream waits between two tokens includes
            # planning, bookkeeping and the optimizer at the step boundary, which grow with the batch.
            self.scheduler.latency.observe(self._observed_shape(plan), step_time_s)
        self.load = self.read_load()
        return outputs

    def _observed_shape(self, plan: IterationPlan) -> StepShape:
        """What the step's time measured: with training on its own thread beside the forward (a CPU),
        the inference alone, slowed by what ran beside it; the training stages' own costs are learned
        from the steps that ran them alone (warm-up, idle steps)."""
        if plan.train is not None and plan.chunks and self.runner.streams.is_threaded:
            return replace(plan.shape, num_train_forward_tokens=0, num_train_backward_tokens=0,
                           num_train_head_tokens=0)
        return plan.shape

    def release_idle(self) -> None:
        """With nothing to run, hand back the KV rows released since the last step (an empty plan),
        under the same guard as a step."""
        self._run_guarded(self.scheduler.schedule())
        if self.trainer is not None:
            self.trainer.follow_store()
            # While all is quiet, idle tenants past the bound still leave memory (the last step may have
            # come just before they had idled long enough), and tenants on disk with untrained samples
            # come back.
            self.trainer.release_versions(self._pinned_versions())
            self._note_versions()
        self.load = self.read_load()

    def _run_guarded(self, plan: IterationPlan) -> RunnerOutput:
        try:
            return self.runner.run(plan)
        except Exception as exc:  # one bad step fails its own requests, not the engine
            log.exception("engine step failed", num_requests=len(plan.chunks))
            message = f"the engine step failed: {type(exc).__name__}: {exc}"
            # The plan's earlier releases too: the scheduler has handed them over once, in this plan.
            self.runner.release([*plan.released_request_ids, *(chunk.request.request_id for chunk in plan.chunks)])
            if self.memory.prefix_cache is not None:  # the step's cache saves may not have happened
                self.memory.prefix_cache.clear()
            failed = {chunk.request.request_id: message for chunk in plan.chunks}
            return RunnerOutput(sampled_token_ids={}, forward_time_s=0.0, failed_request_ids=failed)

    def _after_step(self) -> None:
        """Step boundary: the trainer may publish; new requests then pin the new version."""
        if self.trainer is None:
            return
        with self.runner.streams.training():  # the optimizer reads gradients the training stream wrote
            self.trainer.after_step()
        self._note_versions()
        self.trainer.release_versions(self._pinned_versions())

    def _pinned_versions(self) -> set[tuple[str, int]]:
        return {(r.tenant, r.adapter_version) for r in [*self.scheduler.running, *self.scheduler.waiting]}

    def _note_versions(self) -> None:
        """A version published or followed since the last step is fenced before requests read it."""
        assert self.trainer is not None
        active = self.trainer.active_versions()
        if active != self._active_versions:
            self.runner.streams.publish_fence()
        self._active_versions = active
        self.adapter_version = self.trainer.active_version

    def _account(self, step_time_s: float, output: RunnerOutput) -> None:
        self.num_steps += 1
        self.step_time_s_total += step_time_s
        self.forward_time_s_total += output.forward_time_s

    def _log_step(self, shape: StepShape, step_time_s: float, margin_s: float) -> None:
        latency = self.scheduler.latency
        log.debug("engine step", time_s=round(step_time_s, 6),
                  predicted_s=round(latency.predict(shape), 6), margin_s=round(margin_s, 6),
                  guard_extra_s=round(latency.guard.extra_s, 6),
                  request_bias_s=round(latency.request_bias.extra_s, 6), decode_cap=self.scheduler.decode_cap(),
                  prefill=shape.num_prefill_tokens, decode=shape.num_decode_tokens,
                  train=(shape.num_train_forward_tokens, shape.num_train_backward_tokens, shape.num_train_head_tokens),
                  running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                  drift=round(self.trainer.drift.ratio, 3) if self.trainer is not None else None)

    def read_load(self) -> EngineLoad:
        """A new snapshot of the engine's state (engine thread, or a stopped engine)."""
        plan, cache, training = self.memory.plan, self.memory.prefix_cache, self.memory.training
        return EngineLoad(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_block_size=self.blocks.block_size,
            kv_bytes_per_token=self.runner.kv_bytes_per_token(),
            kv_bytes_allocated=self.runner.kv.nbytes(),
            kv_blocks_cached=cache.num_cached_blocks if cache is not None else 0,
            kv_bytes_cached=self.runner.block_store.nbytes(),
            prefix_cache_queries=cache.num_queried_tokens if cache is not None else 0,
            prefix_cache_hits=cache.num_hit_tokens if cache is not None else 0,
            memory_budget_bytes=plan.budget_bytes,
            memory_learning_bytes=plan.adapters_bytes + plan.learner_bytes,
            memory_training_bytes=training.num_blocks * plan.kv_block_bytes if training is not None else 0,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            step_time_s_total=self.step_time_s_total,
            forward_time_s_total=self.forward_time_s_total,
            latency_error_s=self.scheduler.latency.last_error_s,
            latency_margin_s=self.scheduler.latency.error_margin_s,
            decode_cap=self.scheduler.decode_cap(),
            adapter_version=self.adapter_version,
            train=self.trainer.stats() if self.trainer is not None else None,
        )
