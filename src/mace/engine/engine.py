"""The engine: an async front on the event loop and one thread that owns the model.

    add: Engine.generate() -> inbox -> engine thread
    step: scheduler.schedule() -> runner.run(plan) -> scheduler.update(plan, output)
    out: call_soon_threadsafe -> per-request asyncio.Queue -> detokenizer -> caller

Cancelling the `generate()` iterator (the client went away) aborts the request at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from mace.config import MaceConfig
from mace.engine.detokenizer import IncrementalDetokenizer
from mace.engine.latency import StepShape
from mace.engine.memory import Memory
from mace.engine.plan import IterationPlan, RunnerOutput
from mace.engine.request import Request, RequestOutput, SamplingParams
from mace.engine.runner import ModelRunner
from mace.engine.scheduler import Scheduler
from mace.model.loader import ModelBundle
from mace.train.publish_gate import AdapterCatalog
from mace.train.trainer import Trainer, TrainStats

log = structlog.get_logger(__name__)


class RequestRejected(ValueError):
    """The request can never be served as asked (too long for the context or the KV budget)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(RuntimeError):
    """Admitting the request now would only make it miss its TTFT target: shed it (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class GenerationDelta:
    """Text-level output of one step for one request; the last one carries `finish_reason`."""

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    adapter_version: int
    finish_reason: str | None = None
    error: str | None = None
    queue_time_s: float | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    kv_bytes_per_token: int
    kv_bytes_allocated: int
    kv_blocks_cached: int
    kv_bytes_cached: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found
    memory_budget_bytes: int
    memory_learning_bytes: int  # adapter versions and the learner's optimizer state
    memory_training_bytes: int  # activations reserved for training now
    num_preemptions: int
    num_steps: int
    step_time_s_total: float
    forward_time_s_total: float
    latency_error_s: float
    latency_margin_s: float
    decode_cap: int  # the most requests the scheduler runs at once now
    train: TrainStats | None


class Engine:
    def __init__(self, bundle: ModelBundle, config: MaceConfig, trainer: Trainer | None = None) -> None:
        self.bundle = bundle
        self.config = config
        self.runner = ModelRunner(bundle.causal_lm, config.model.max_model_len, bundle.device,
                                  overlap_streams=config.engine.overlap_streams, kv_block_size=config.memory.block_size)
        self.memory = Memory.build(config, bundle.causal_lm, self.runner.kv_bytes_per_token(), bundle.device)
        self.blocks = self.memory.pool
        # A request that fits alone must always be servable, so the context never exceeds the budget.
        self.max_model_len = min(config.model.max_model_len, bundle.max_position, self.blocks.capacity_tokens)
        self.runner.kv.max_model_len = self.max_model_len
        self.trainer = trainer
        self.runner.trainer = trainer
        if self.memory.pruner is not None:
            self.runner.kv.enable_importance()
        self.scheduler = Scheduler(
            config.engine, self.blocks, slo=config.slo,
            policy=trainer.policy if trainer is not None else None, train_source=trainer,
            prefix_cache=self.memory.prefix_cache, train_memory=self.memory.training, pruner=self.memory.pruner,
        )
        self.adapter_version = trainer.active_version if trainer is not None else 0
        self.num_shed: dict[str, int] = {}  # requests answered 429 by admission control, by SLO class
        self.num_steps = 0
        self.last_plan: IterationPlan | None = None
        self.step_time_s_total = 0.0
        self.forward_time_s_total = 0.0
        self._inbox: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._loop_done: concurrent.futures.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}

    # ---- lifecycle (event loop side) ----

    def start(self, model_thread: concurrent.futures.Executor | None = None) -> None:
        """Run the step loop on `model_thread` (the one-worker executor that loaded the model) or a new thread.

        Keeping every torch call on one OS thread matters on CPU: a second thread that has run OpenMP
        work (loading the model, say) leaves a thread team behind that slows the engine's kernels.
        """
        self._loop = asyncio.get_running_loop()
        if model_thread is None:
            model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mace-engine")
        self.notify_feedback()  # samples acknowledged before a restart are trained without waiting for a POST
        self._loop_done = model_thread.submit(self._run_loop)

    @property
    def is_running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._loop_done is not None:
            concurrent.futures.wait([self._loop_done], timeout=timeout_s)
        if self.trainer is not None:
            self.trainer.close()

    def stats(self) -> EngineStats:
        plan, cache, training = self.memory.plan, self.memory.prefix_cache, self.memory.training
        return EngineStats(
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
            train=self.trainer.stats() if self.trainer is not None else None,
        )

    @property
    def has_trainer(self) -> bool:
        """Whether journaled feedback is trained on (a retraining policy is on)."""
        return self.trainer is not None

    def adapters(self) -> AdapterCatalog:
        """The published adapter versions, from memory (none without a trainer); safe from the event loop."""
        if self.trainer is None:
            return AdapterCatalog((), auto_publish=False)
        return self.trainer.adapters()

    # ---- requests (event loop side) ----

    def check_request(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise RequestRejected("the prompt is empty", param="prompt")
        if num_prompt_tokens >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {num_prompt_tokens} tokens; this model's context is {self.max_model_len} "
                "tokens including the completion",
                param="messages",
            )

    def resolve_slo_class(self, name: str | None) -> str:
        """The configured class `name` (the default class if None); RequestRejected if unknown."""
        slo = self.config.slo
        chosen = slo.default_class if name is None else name
        if chosen not in slo.class_names:
            raise RequestRejected(f"unknown SLO class {chosen!r}; this server has {', '.join(slo.class_names)}",
                                  param="mace_slo")
        return chosen

    def check_admission(self, num_prompt_tokens: int, slo_class: str) -> None:
        """Shed a request (Overloaded) when the queue is past its bound and the latency model predicts
        that, even admitted now, it would miss its TTFT target. First-come-first-served sheds nothing."""
        engine = self.config.engine
        if engine.scheduling != "slo" or len(self.scheduler.waiting) < engine.shed_queue_depth:
            return
        target_s = self.config.slo.target(slo_class).ttft_s
        predicted_s = self.scheduler.predict_ttft_s(num_prompt_tokens, target_s, time.monotonic())
        if predicted_s > target_s:
            self.num_shed[slo_class] = self.num_shed.get(slo_class, 0) + 1
            raise Overloaded(
                f"the server is overloaded: a request of class {slo_class!r} would get its first token in about "
                f"{predicted_s:.1f}s, past its {target_s:g}s target; retry shortly",
                retry_after_s=max(1, math.ceil(predicted_s - target_s)),
            )

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        slo_class: str | None = None, priority: int = 0,
    ) -> AsyncIterator[GenerationDelta]:
        """Yields text deltas until the request finishes; closing the iterator early aborts it."""
        self.check_request(len(prompt_token_ids))
        slo_class = self.resolve_slo_class(slo_class)
        target = self.config.slo.target(slo_class)
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already in flight", param="request_id")
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=self.bundle.eos_token_ids,
            max_model_len=self.max_model_len,
            arrival_time_s=time.monotonic(),
            adapter_version=self.adapter_version,
            slo_class=slo_class,
            ttft_s=target.ttft_s,
            tpot_s=target.tpot_s,
            priority=priority,
        )
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        detokenizer = IncrementalDetokenizer(self.bundle.tokenizer, params.stop)
        finished = False
        self._submit(lambda: self.scheduler.add_request(request))
        try:
            while not finished:
                output = await stream.get()
                text = detokenizer.add(output.new_token_ids)
                finish_reason = output.finish_reason
                if detokenizer.stopped_by is not None and finish_reason is None:
                    finish_reason = "stop"
                    self.abort(request_id)
                if finish_reason is not None:
                    text += detokenizer.finish()
                    finished = True
                yield GenerationDelta(
                    request_id=request_id,
                    text=text,
                    token_ids=output.new_token_ids,
                    num_prompt_tokens=output.num_prompt_tokens,
                    num_output_tokens=output.num_output_tokens,
                    adapter_version=output.adapter_version,
                    finish_reason=finish_reason,
                    error=output.error,
                    queue_time_s=output.queue_time_s,
                    num_cached_tokens=output.num_cached_tokens,
                )
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort_now(request_id))

    def notify_feedback(self) -> None:
        """New samples are in the journal: score them on the engine thread between steps."""
        if self.trainer is not None:
            self._submit(self.trainer.ingest)

    async def activate_adapter(self, version: int) -> None:
        """Serve `version` to new requests from the next step on (rollback or forward)."""
        trainer = self.trainer
        if trainer is None:
            raise RequestRejected("no retraining policy is on, so only version 0 exists", param="version")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def activate() -> None:
            try:
                trainer.activate(version)
                self.adapter_version = version
                loop.call_soon_threadsafe(done.set_result, None)
            except Exception as exc:  # reported to the caller, the engine goes on
                loop.call_soon_threadsafe(done.set_exception, exc)

        self._submit(activate)
        await done

    def _submit(self, action: Callable[[], object]) -> None:
        self._inbox.put(action)
        self._wakeup.set()

    # ---- engine thread ----

    def _run_loop(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox()
            if not self.scheduler.has_work:
                self.release_idle()
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            self._publish(self.step())

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        plan = self.last_plan = self.scheduler.schedule()
        margin_s = self.scheduler.latency.error_margin_s  # as planned: finished requests teach the guard below
        output = self._run_guarded(plan)
        outputs = self.scheduler.update(plan, output)
        self._after_step()
        step_time_s = time.perf_counter() - started
        self._account(step_time_s, output)
        shape = plan.shape
        if log.is_enabled_for(logging.DEBUG):  # a prediction per step only when someone reads it
            self._log_step(shape, step_time_s, margin_s)
        if output.forward_time_s > 0:
            # The whole iteration, not the forward alone: what a stream waits between two tokens includes
            # planning, bookkeeping and the optimizer at the step boundary, which grow with the batch.
            self.scheduler.latency.observe(shape, step_time_s)
        return outputs

    def _log_step(self, shape: StepShape, step_time_s: float, margin_s: float) -> None:
        log.debug("engine step", time_s=round(step_time_s, 6),
                  predicted_s=round(self.scheduler.latency.predict(shape), 6), margin_s=round(margin_s, 6),
                  prefill=shape.num_prefill_tokens, decode=shape.num_decode_tokens,
                  train=(shape.num_train_forward_tokens, shape.num_train_backward_tokens, shape.num_train_head_tokens),
                  running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                  drift=round(self.trainer.drift.ratio, 3) if self.trainer is not None else None)

    def _after_step(self) -> None:
        """Step boundary: the trainer may publish; new requests then pin the new version."""
        if self.trainer is None:
            return
        with self.runner.streams.training():  # the optimizer reads gradients the training stream wrote
            self.trainer.after_step()
        if self.trainer.active_version != self.adapter_version:
            self.runner.streams.publish_fence()
        self.adapter_version = self.trainer.active_version
        pinned = {r.adapter_version for r in [*self.scheduler.running, *self.scheduler.waiting]}
        self.trainer.release_versions(pinned)

    def _account(self, step_time_s: float, output: RunnerOutput) -> None:
        self.num_steps += 1
        self.step_time_s_total += step_time_s
        self.forward_time_s_total += output.forward_time_s

    def _run_guarded(self, plan: IterationPlan) -> RunnerOutput:
        try:
            return self.runner.run(plan)
        except Exception as exc:  # one bad step fails its own requests, not the engine
            log.exception("engine step failed", num_requests=len(plan.chunks))
            message = f"the engine step failed: {type(exc).__name__}: {exc}"
            self.runner.release([chunk.request.request_id for chunk in plan.chunks])
            if self.memory.prefix_cache is not None:  # the step's cache saves may not have happened
                self.memory.prefix_cache.clear()
            failed = {chunk.request.request_id: message for chunk in plan.chunks}
            return RunnerOutput(sampled_token_ids={}, forward_time_s=0.0, failed_request_ids=failed)

    def _drain_inbox(self) -> None:
        while True:
            try:
                action = self._inbox.get_nowait()
            except queue.Empty:
                return
            action()

    def _abort_now(self, request_id: str) -> None:
        output = self.scheduler.abort_request(request_id)
        if output is not None:
            self._publish([output])

    def release_idle(self) -> None:
        plan = self.scheduler.schedule()  # empty: only hands back KV slots released since the last step
        self.runner.run(plan)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)
