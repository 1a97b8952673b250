"""The trainer's staged tasks and their typed results (engine thread).

A task is one loss pass (forward only: scoring new samples, or one side of the publish gate's
held-out evaluation) or one micro-step (forward and backward on the learner). Loss requests under the
same adapter of the same lineage join one queued pass that has not started, up to its padded size
(`layered.passes`): scoring 16 new samples is four passes, not sixteen. Each hands out its
stages labelled with its id (train/work.py); the scheduler plans a prefix of them and `TaskQueue.run`
runs each planned stage on the task it names, checking it is that task's next one.

Results are read at the step boundary, never mid-step: reading a loss waits for the device.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from mace.tenancy import SHARED
from mace.train.layered import MAX_PASS_TOKENS, LayeredLoss, LayeredMicroStep, distinct, loss_stages, padded_tokens
from mace.train.replay import TrainSample
from mace.train.work import TrainStage


class LossPurpose(StrEnum):
    SCORE = "score"  # a new sample's value under the serving version (its replay value, the drift)
    CANDIDATE = "candidate"  # the publish gate's candidate on a held-out sample
    SERVING = "serving"  # the serving version on a held-out sample, for the publish gate
    ANCHOR = "anchor"  # the publish gate's candidate on an anchor: version 0's own answer to a general question
    ANCHOR_BASE = "anchor_base"  # version 0 on an anchor, once per gate: what the candidate is held to


@dataclass(frozen=True)
class LossRequest:
    sample: TrainSample
    purpose: LossPurpose
    adapter: str | None = None  # None: the version serving when the pass starts
    held_out: bool = False  # SCORE: where the sample is filed once scored
    tenant: str = SHARED  # the lineage the sample and the pass belong to


@dataclass(frozen=True)
class LossResult:
    request: LossRequest
    loss: float  # NaN when the pass failed


class StageMismatch(RuntimeError):
    """A planned stage is not the next stage of the task it names."""


class _Task:
    def __init__(self, task_id: int, stages: list[TrainStage]) -> None:
        self.task_id = task_id
        self._stages = [replace(stage, task_id=task_id, index=index) for index, stage in enumerate(stages)]
        self._next = 0

    @property
    def remaining(self) -> list[TrainStage]:
        return self._stages[self._next :]

    @property
    def is_done(self) -> bool:
        return self._next == len(self._stages)

    def check(self, stage: TrainStage) -> None:
        if stage.index != self._next:
            raise StageMismatch(f"task {self.task_id}: planned stage {stage.index}, next is {self._next}")

    def run_next(self) -> None:
        self._run_next()
        self._next += 1

    def _run_next(self) -> None:
        raise NotImplementedError


class LossTask(_Task):
    """Some samples' losses under one adapter of one lineage; the pass is built at its first stage, so a
    score is taken under the version serving by then. Requests join it until that first stage; a sample
    identical to one already in it takes no row of its own."""

    def __init__(self, task_id: int, request: LossRequest, num_layers: int,
                 begin: Callable[[LossRequest, list[TrainSample]], LayeredLoss]) -> None:
        super().__init__(task_id, loss_stages([request.sample], num_layers))
        self.requests = [request]
        self._num_layers = num_layers
        self._begin = begin
        self._pass: LayeredLoss | None = None
        self._places: list[int] = []  # each request's row in the pass

    def can_join(self, request: LossRequest, max_tokens: int = MAX_PASS_TOKENS) -> bool:
        first = self.requests[0]
        rows, _ = distinct([*(r.sample for r in self.requests), request.sample])
        return (self._next == 0 and (request.adapter, request.tenant) == (first.adapter, first.tenant)
                and padded_tokens(rows) <= max_tokens)

    def join(self, request: LossRequest) -> None:
        self.requests.append(request)
        rows, _ = distinct([r.sample for r in self.requests])
        stages = loss_stages(rows, self._num_layers)
        self._stages = [replace(stage, task_id=self.task_id, index=index) for index, stage in enumerate(stages)]

    def _run_next(self) -> None:
        if self._pass is None:
            rows, self._places = distinct([r.sample for r in self.requests])
            self._pass = self._begin(self.requests[0], rows)
        self._pass.run_next()

    def results(self) -> list[LossResult]:
        """The losses (reading them waits for the device: call it at a step boundary)."""
        if self._pass is None or not self.is_done:
            return [LossResult(request, math.nan) for request in self.requests]
        losses = self._pass.losses
        return [LossResult(request, losses[place]) for request, place in zip(self.requests, self._places, strict=True)]

    def abandon(self) -> None:
        """A stage failed: the task ends now, its results NaN."""
        self._pass = None
        self._next = len(self._stages)


class MicroStepTask(_Task):
    def __init__(self, task_id: int, step: LayeredMicroStep, warm_up: bool) -> None:
        super().__init__(task_id, step.remaining)
        self.step = step
        self.warm_up = warm_up  # synthetic: measured, never counted (its gradients are discarded)

    def _run_next(self) -> None:
        self.step.run_next()


class TaskQueue:
    """Loss passes first (upkeep, in the order queued), then at most one open micro-step."""

    def __init__(self, num_layers: int, begin_loss: Callable[[LossRequest, list[TrainSample]], LayeredLoss]) -> None:
        self._num_layers = num_layers
        self._begin_loss = begin_loss
        self._ids = itertools.count(1)
        self._upkeep: deque[LossTask] = deque()
        self._done_upkeep: list[LossTask] = []  # their results are read at the next step boundary, in order
        self.job: MicroStepTask | None = None
        self.finished_jobs: list[MicroStepTask] = []  # accounted once settled, in order

    def queue_loss(self, request: LossRequest) -> None:
        joinable = next((task for task in self._upkeep if task.can_join(request)), None)
        if joinable is not None:
            joinable.join(request)
        else:
            self._upkeep.append(LossTask(next(self._ids), request, self._num_layers, self._begin_loss))

    def open_job(self, step: LayeredMicroStep, warm_up: bool = False) -> None:
        assert self.job is None, "one micro-step at a time"
        self.job = MicroStepTask(next(self._ids), step, warm_up)

    def upkeep_stages(self) -> list[TrainStage]:
        return [stage for task in self._upkeep for stage in task.remaining]

    def job_stages(self) -> list[TrainStage]:
        return self.job.remaining if self.job is not None else []

    @property
    def is_warming_up(self) -> bool:
        jobs = self.finished_jobs if self.job is None else [self.job, *self.finished_jobs]
        return any(task.warm_up for task in jobs)

    def run(self, stage: TrainStage) -> None:
        """Run `stage` on the task it names (StageMismatch if that is not the task's next stage)."""
        task = self._task(stage.task_id)
        task.check(stage)
        try:
            task.run_next()
        except Exception:
            if isinstance(task, LossTask):
                task.abandon()
                self._finish_loss(task)
            raise
        if task.is_done:
            if isinstance(task, LossTask):
                self._finish_loss(task)
            else:
                self.finished_jobs.append(task)
                self.job = None

    def _task(self, task_id: int) -> LossTask | MicroStepTask:
        if self.job is not None and self.job.task_id == task_id:
            return self.job
        task = next((task for task in self._upkeep if task.task_id == task_id), None)
        if task is None:
            raise StageMismatch(f"the plan names task {task_id}, which is not queued")
        return task

    def _finish_loss(self, task: LossTask) -> None:
        self._upkeep.remove(task)
        self._done_upkeep.append(task)

    def drop_job(self) -> None:
        """Forget the open micro-step (a stage failed)."""
        self.job = None

    def take_results(self) -> list[LossResult]:
        done, self._done_upkeep = self._done_upkeep, []
        return [result for task in done for result in task.results()]

    def take_settled_jobs(self) -> list[MicroStepTask]:
        """Finished micro-steps whose kernels are done (reading their losses does not stall), in order."""
        settled: list[MicroStepTask] = []
        while self.finished_jobs and self.finished_jobs[0].step.is_settled:
            settled.append(self.finished_jobs.pop(0))
        return settled
