"""Decides each iteration, without touching tensors, which requests run and how many tokens each.

Scheduling is by token budget, not by phases: running requests first (one token each while
decoding, the next prompt chunk while prefilling), then waiting requests admitted while the
budget, the running-request limit and KV memory allow. While requests are decoding, prompt tokens
are capped so the latency model predicts the step within the TPOT target (chunked prefill never
stalls a stream). Admission is by priority, and a request that does not fit is passed by smaller
ones (best fit). When KV memory runs out, the pool first evicts unused cached prefixes and shrinks
training; then the least important running request is preempted (its KV freed, recomputed when it
is admitted again, from the prefix cache where it can).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mace.config import EngineConfig, SloConfig
from mace.engine.decode_cap import decode_cap, gives_way, hard_decode_cap, victims_at_cap, wait_for_place_s
from mace.engine.kv_blocks import BlockPool
from mace.engine.kv_pruning import KVPruner
from mace.engine.latency import LatencyModel
from mace.engine.plan import IterationPlan, RunnerOutput, ScheduledChunk
from mace.engine.prefix_cache import PrefixCache
from mace.engine.request import Request, RequestOutput, RequestStatus
from mace.engine.step_budget import StepBudget
from mace.engine.train_planner import StepLimits, TrainPlanner, TrainSource
from mace.train.policy import NoTraining, RetrainPolicy

if TYPE_CHECKING:
    from mace.engine.memory import TrainingReservation

MAX_ADMISSION_SKIPS = 32  # steps smaller requests may pass one that does not fit, before it blocks them
PROMPT_CHUNK_SHARE_WEIGHT = 0.05  # of the newest decoding step in `prompt_chunk_share`: about the last 20


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        blocks: BlockPool,
        clock: Callable[[], float] = time.monotonic,
        slo: SloConfig | None = None,
        policy: RetrainPolicy | None = None,
        train_source: TrainSource | None = None,
        prefix_cache: PrefixCache | None = None,
        train_memory: TrainingReservation | None = None,
        pruner: KVPruner | None = None,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.prefix_cache = prefix_cache
        self.pruner = pruner
        self.clock = clock
        self.slo = slo or SloConfig()
        self.latency = LatencyModel()
        self.latency.guard.reference_s = min(self.slo.target(name).tpot_s for name in self.slo.class_names)
        self.budget = StepBudget(config, self.slo, self.latency, lambda: self.clock())  # follows a swapped clock
        # Warm-up decodes batches past the TPOT cap: a fit over one or two decodes cannot tell a decode's
        # cost from a step's fixed cost, and the cap is computed from that fit.
        self.is_measuring = False
        self.training = (TrainPlanner(train_source, policy or NoTraining(), self.latency, self.slo, train_memory, clock)
                         if train_source is not None else None)
        self.waiting: list[Request] = []  # in queue order (see _queue_key)
        self.running: list[Request] = []
        self._released: list[str] = []
        self._prefill_room = 0  # prompt tokens this step may still take (set by schedule)
        # Of the steps that decoded, the share that also carried a prompt chunk (a running mean); starts
        # at 1, the cautious end, until steps are seen.
        self.prompt_chunk_share = 1.0
        self._num_enqueued = 0
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running) or self._has_training()

    def _has_training(self) -> bool:
        return self.training is not None and self.training.has_work(self._step_limits())

    def _step_limits(self) -> StepLimits:
        decoding = [r for r in self.running if not r.is_prefilling]
        return StepLimits(tpot_s=self.budget.step_budget_s(decoding),
                          ttft_slack_s=self.budget.ttft_slack_s(self.running, self.waiting))

    def add_request(self, request: Request) -> None:
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self._num_enqueued += 1
        request.queue_seq = self._num_enqueued
        bisect.insort(self.waiting, request, key=self._queue_key)

    def _queue_key(self, request: Request) -> tuple[float, float, int]:
        """Earliest TTFT deadline first ("slo"), or arrival order ("fcfs").

        Deadlines age by themselves: a relaxed class's deadline passes too, and then it is served
        before newer interactive requests, so nothing starves. A preempted request keeps its early
        deadline (or arrival) and goes back near the front.
        """
        if self.config.scheduling == "slo":
            return (request.ttft_deadline_s, request.arrival_time_s, request.queue_seq)
        return (request.arrival_time_s, 0.0, request.queue_seq)

    def predict_ttft_s(self, num_prompt_tokens: int, ttft_s: float, now_s: float) -> float:
        """How long a request arriving now would wait for its first token (`StepBudget.predict_ttft_s`).

        Read from the event loop by admission: the queues are copied before anything iterates them."""
        waiting, running = list(self.waiting), list(self.running)
        soft, hard = self._decode_caps()
        predicted_s = self.budget.predict_ttft_s(num_prompt_tokens, ttft_s, now_s, waiting, running, soft)
        if predicted_s <= ttft_s or hard <= soft:
            return predicted_s
        # It would wait past its target for a place under the margin's cap: the cap gives the margin up.
        return self.budget.predict_ttft_s(num_prompt_tokens, ttft_s, now_s, waiting, running, hard)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return self._finish(request, RequestStatus.FINISHED_ABORTED, [])
        for request in self.running:
            if request.request_id == request_id:
                return self._finish(request, RequestStatus.FINISHED_ABORTED, [])
        return None

    def schedule(self) -> IterationPlan:
        budget = self.config.max_num_batched_tokens
        self._prefill_room = self.budget.prefill_budget(self.running)
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        cap = self.decode_cap()  # once per step: the waiting queue's first deadline decides it
        yielded = self._give_way_at_cap(cap)
        budget = self._schedule_running(budget, chunks, preempted)
        if not preempted:  # short of memory: admit nobody this step
            self._admit_waiting(budget, chunks, cap)
        preempted += yielded
        train = None
        if self.training is not None:
            planned = self.training.plan(IterationPlan(chunks=chunks).shape, self._step_limits())
            chunks, train = ([] if planned.pause_serving else chunks), planned.work
        released, self._released = self._released, []
        copies = self.prefix_cache.take_copies() if self.prefix_cache is not None else []
        return IterationPlan(
            chunks=chunks, released_request_ids=released, preempted_request_ids=preempted, train=train,
            kv_copies=copies, kv_prunes=self.pruner.take_prunes() if self.pruner is not None else [],
        )

    def _take_prefill(self, request: Request, num_new: int) -> int:
        if not request.is_prefilling:
            return num_new
        num_new = min(num_new, self._prefill_room)
        self._prefill_room -= num_new
        return num_new

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk], preempted: list[str]) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._take_prefill(request, min(request.num_uncomputed_tokens, budget))
            if num_new == 0:
                index += 1
                continue
            if not self._reserve(request, num_new, preempted):
                break
            chunks.append(ScheduledChunk.of(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _reserve(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Grow `request`'s KV by `num_new` tokens; short of memory (cached prefixes and training already
        given back by the pool), preempt from the back of `running`: the least important request, the
        latest admitted of equals (never one already planned this step)."""
        if self.prefix_cache is not None:  # its prompt's KV, as soon as computed, for requests sharing it
            self.prefix_cache.save(request, request.num_prompt_tokens)
        if self.pruner is not None:
            self.pruner.prune_over_budget(request, num_new)
        while not self.blocks.grow(request.request_id, request.num_kv_tokens + num_new):
            if self.pruner is not None and self.pruner.prune_for_memory(request):
                continue
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk], max_running: int) -> None:
        """Admit by priority, then queue order; past one that does not fit, the largest that still fits
        goes first (best fit, no head-of-line blocking) until it has been passed MAX_ADMISSION_SKIPS times."""
        candidates = sorted(self.waiting, key=lambda r: r.priority)
        passed: Request | None = None
        while candidates and budget > 0 and len(self.running) < max_running:
            request = candidates.pop(0)
            num_new = min(request.num_uncomputed_tokens, budget, self._prefill_room)
            if num_new == 0:
                break
            if self._waits_for_shared_prefill(request):
                continue
            if not self._allocate(request):
                if request.num_admission_skips >= MAX_ADMISSION_SKIPS:
                    break  # it fits alone: let memory drain until it does
                if passed is None:
                    passed = request
                    candidates.sort(key=lambda r: (r.priority, -r.num_tokens))
                continue
            num_new = min(request.num_uncomputed_tokens, budget, self._prefill_room)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time_s is None:
                request.first_scheduled_time_s = self.clock()
            bisect.insort_right(self.running, request, key=lambda r: r.priority)  # least important last
            chunks.append(ScheduledChunk.of(request, num_new))
            budget -= num_new
            self._prefill_room -= num_new
        if passed is not None:
            passed.num_admission_skips += 1

    def _waits_for_shared_prefill(self, request: Request) -> bool:
        cache = self.prefix_cache
        if cache is None or request.num_computed_tokens:
            return False
        return cache.waits_for_prefill(request, [r for r in self.running if r.is_prefilling])

    def decode_cap(self) -> int:
        """How many requests may run at once: under "slo" scheduling the TPOT-bound cap with its margins
        (engine/decode_cap.py), grown to the cap without them while the first waiting request would
        otherwise wait for a place past its TTFT deadline; `max_num_seqs` under FCFS.

        The margins are for streams' TPOT; a request refused or queued for seconds loses more than a
        stream a little past its TPOT does (one fact learned beside chat on a slow CPU: a cap of 2 left 4
        queued and most chat refused, docs/results/train/learn.md)."""
        if not self.waiting:
            return self._soft_cap()  # the cap without margins is only for a request that would wait
        soft, hard = self._decode_caps()
        if hard <= soft:
            return soft
        first = min(self.waiting, key=lambda r: (r.priority, r.ttft_deadline_s))
        blocking = [r for r in self.running if not gives_way(r, first.ttft_s, first.ttft_deadline_s)]
        wait_s = wait_for_place_s(self.latency, blocking, len(self.waiting), soft)
        return hard if self.clock() + wait_s > first.ttft_deadline_s else soft

    def _decode_caps(self) -> tuple[int, int]:
        """(the cap with its margins, the cap without them)."""
        soft = self._soft_cap()
        if self.config.scheduling != "slo" or self.is_measuring:
            return soft, soft
        return soft, max(soft, hard_decode_cap(self.latency, self.slo, self.config.max_num_seqs))

    def _soft_cap(self) -> int:
        if self.config.scheduling != "slo" or self.is_measuring:
            return self.config.max_num_seqs
        return decode_cap(self.latency, self.slo, self.config.max_num_seqs, self.budget.min_prefill_chunk(),
                          self.prompt_chunk_share)

    def _give_way_at_cap(self, cap: int) -> list[str]:
        """At the decode cap, more urgent waiting requests take the places of the loosest running ones."""
        if self.config.scheduling != "slo":
            return []
        victims = victims_at_cap(list(self.waiting), self.running, cap)
        for victim in victims:
            self._preempt(victim)
        return [victim.request_id for victim in victims]

    def _allocate(self, request: Request) -> bool:
        """KV blocks for all of `request`'s known tokens (no thrashing mid-prefill); a cached prefix is loaded."""
        cache = self.prefix_cache
        hit = cache.match(request) if cache is not None and request.num_computed_tokens == 0 else None
        if not self.blocks.grow(request.request_id, request.num_tokens):
            if cache is not None:
                cache.unpin()
            return False
        if cache is not None and hit is not None:
            cache.commit(request, hit)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        self._released.append(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_pruned_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def update(self, plan: IterationPlan, output: RunnerOutput) -> list[RequestOutput]:
        """Advance counters, append sampled tokens, finish requests; one output per request that moved."""
        outputs: list[RequestOutput] = []
        shape = plan.shape
        if shape.num_decode_tokens:
            has_chunk = 1.0 if shape.num_prefill_chunks else 0.0
            self.prompt_chunk_share += PROMPT_CHUNK_SHARE_WEIGHT * (has_chunk - self.prompt_chunk_share)
        predicted_s = self.latency.predict(shape) if plan.chunks else 0.0
        for chunk in plan.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue
            if plan.train is not None and plan.train.stages:
                request.num_steps_with_training += 1
            if request.first_token_time_s is not None:  # a step between two of its tokens
                request.predicted_decode_s_total += predicted_s
            error = output.failed_request_ids.get(request.request_id)
            if error is not None:
                request.error = error
                outputs.append(self._finish(request, RequestStatus.FINISHED_ERROR, []))
                continue
            request.num_computed_tokens = chunk.end_position
            token = output.sampled_token_ids.get(request.request_id)
            if token is None:
                continue
            request.append_output_token(token)
            if request.first_token_time_s is None:
                request.first_token_time_s = self.clock()
            stop = request.check_stop()
            if stop is not None:
                self._observe_tpot(request)
                outputs.append(self._finish(request, stop, [token]))
            else:
                outputs.append(request.output([token]))
        return outputs

    def _observe_tpot(self, request: Request) -> None:
        """A finished request's TPOT against its target teaches the step margin (`TpotGuard`, which
        planners keep free under the target); against its predicted steps, when no training shared
        them, the decode cap's (`RequestBias`). The step margin learns from every request: counting only
        those beside training cut TPOT attainment on the personalization trace from 100% to 93% and
        training's tokens by a third (docs/results/train/compare.md). One that was preempted waited
        without decoding, which says nothing about either."""
        first_s = request.first_token_time_s
        if first_s is None or request.num_output_tokens < 2 or request.num_preemptions:
            return
        num_gaps = request.num_output_tokens - 1
        tpot_s = (self.clock() - first_s) / num_gaps
        self.latency.guard.observe(tpot_s, self.budget.tpot_target_s(request))
        if not request.num_steps_with_training:  # what the batch alone costs (`LatencyModel.mean_margin_s`)
            self.latency.request_bias.observe(tpot_s, request.predicted_decode_s_total / num_gaps)

    def _finish(self, request: Request, status: RequestStatus, new_tokens: list[int]) -> RequestOutput:
        if request in self.running:
            self.running.remove(request)
        if self.prefix_cache is not None and status is not RequestStatus.FINISHED_ERROR:
            self.prefix_cache.save(request, request.num_computed_tokens)  # later chat turns start with it
        self.blocks.free(request.request_id)
        self._released.append(request.request_id)
        request.status = status
        return request.output(new_tokens)

