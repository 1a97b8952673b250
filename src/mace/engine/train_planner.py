"""Training's share of each engine iteration, without touching tensors.

After the scheduler has planned a step's inference, the retraining policy turns the step's slack
into a training budget (`train/policy.py`), and the planner takes the longest prefix of the
trainer's stages whose predicted cost fits it: upkeep (scoring, the publish gate's evaluation) may
use all of the slack, training stages only the policy's budget.

Training eases in once the server starts serving: warm-up measures its stages on an idle machine,
and beside live streams (the event loop, clients on the same cores) they first run slower than that
fit says; over the first `EASE_IN_STEPS` steps that train beside inference, the budget (and the
slack upkeep may take: scoring the first samples) grows from a quarter to all of it while the
latency model refits on live steps. The steps counted are those with training work waiting, whether
or not a stage of it fitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from mace.config import SloConfig
from mace.engine.latency import LatencyModel, StepShape
from mace.engine.plan import shape_of
from mace.train.layered import MAX_PASS_TOKENS
from mace.train.policy import RetrainPolicy, TrainContext, TrainDecision
from mace.train.work import TrainStage, TrainWork

if TYPE_CHECKING:
    from mace.engine.memory import TrainingReservation

PROBE_EVERY_STEPS = 32
EASE_IN_STEPS = 32
EASE_IN_FIRST_SHARE = 0.25


class TrainSource(Protocol):
    """Where training stages come from (the trainer); tensor-free from the planner's side.

    The planner takes a prefix of `upkeep_stages() + job_stages(...)` each step; the runner then
    runs exactly those stages, in that order.
    """

    @property
    def num_trainable(self) -> int: ...

    @property
    def num_samples_read(self) -> int: ...

    @property
    def is_converged(self) -> bool: ...

    def drift_ratio(self) -> float: ...

    def upkeep_stages(self) -> list[TrainStage]:
        """Forward-only work waiting: scoring new samples, evaluating the publish gate."""
        ...

    def job_stages(self, max_job_tokens: int, max_pass_tokens: int = MAX_PASS_TOKENS) -> list[TrainStage]:
        """The current micro-step's remaining stages, starting one of up to `max_job_tokens` if none is open,
        its samples in passes of at most `max_pass_tokens` padded tokens (train/layered.py)."""
        ...


@dataclass(frozen=True)
class StepLimits:
    """What the requests being served allow this step (from the scheduler)."""

    tpot_s: float  # the tightest decoding request's budget for this step
    ttft_slack_s: float  # what the most pressed request waiting for its first token can spare


@dataclass(frozen=True)
class TrainPlan:
    work: TrainWork | None
    pause_serving: bool = False  # the policy takes the whole step (periodic)


class TrainPlanner:
    def __init__(self, source: TrainSource, policy: RetrainPolicy, latency: LatencyModel, slo: SloConfig,
                 train_memory: TrainingReservation | None, clock: Callable[[], float]) -> None:
        self.source = source
        # Where training runs on its own thread beside the forward (a CPU, engine/streams.py): its share
        # of the cores. A stage's cost was measured on all of them, so this share of the forward's
        # predicted time is what it may take there without lengthening the step.
        self.beside_share = 0.0
        self.policy = policy
        self.latency = latency
        self.slo = slo
        self.train_memory = train_memory
        self.clock = clock
        self._steps_since_probe = 0
        self._ease_in_left = 0
        # The policy's budget left unspent while the next training stage waited for more: the policy gives
        # a share of the slack, and a stage bigger than one step's share (a head part: a fixed read of the
        # whole LM head) runs once its share over a few steps adds up to it, instead of never.
        self._credit_s = 0.0

    def ease_in(self, num_steps: int = EASE_IN_STEPS) -> None:
        """Give training beside inference a growing share of its budget over the next `num_steps` such steps."""
        self._ease_in_left = num_steps

    def _ease_in_share(self, context: TrainContext) -> float:
        """The share of its budget (and of the slack, for upkeep) training may take this step."""
        if not (self._ease_in_left and context.has_inference):
            return 1.0
        done = max(0, EASE_IN_STEPS - self._ease_in_left) / EASE_IN_STEPS
        return EASE_IN_FIRST_SHARE + (1.0 - EASE_IN_FIRST_SHARE) * done

    def has_work(self, limits: StepLimits) -> bool:
        if self.source.upkeep_stages():
            return True
        context = self._context(StepShape(), limits)
        return self.source.num_trainable > 0 and self.policy.decide(context).budget_s > 0

    def plan(self, inference: StepShape, limits: StepLimits) -> TrainPlan:
        """Training stages beside this step's inference."""
        self._steps_since_probe += 1
        context = self._context(inference, limits)
        share = self._ease_in_share(context)
        decision = self.policy.decide(context)
        if share < 1.0 and math.isfinite(decision.budget_s):
            decision = replace(decision, budget_s=decision.budget_s * share)
        accrues = share == 1.0 and 0 < decision.budget_s < math.inf  # easing in holds the budget down on purpose
        if accrues:  # never past the step's slack: the streams' targets come first
            room_s = max(decision.budget_s, context.slack_s + context.beside_s)
            decision = replace(decision, budget_s=min(room_s, decision.budget_s + self._credit_s))
        stages = self.source.upkeep_stages()
        max_job_tokens = self._max_train_tokens(decision.max_job_tokens)
        if decision.budget_s > 0 and max_job_tokens > 0:
            stages += self.source.job_stages(max_job_tokens, self._max_pass_tokens(decision.budget_s))
        taken = self._fit_stages(stages, context, decision, upkeep_share=share)
        waiting = len(taken) < len(stages) and not stages[len(taken)].is_upkeep
        spent_s = sum(self.latency.marginal_s(shape_of(0, 0, TrainWork((stage,))))
                      for stage in taken if not stage.is_upkeep)
        self._credit_s = max(0.0, decision.budget_s - spent_s) if accrues and waiting else 0.0
        if self._ease_in_left and context.has_inference and stages:
            # Counted whether or not a stage fitted: a stage that fits only the whole slack would
            # otherwise wait at a quarter of it for as long as anyone is served.
            self._ease_in_left -= 1
        if not taken:
            return TrainPlan(None)
        pause = decision.pause_serving and any(not stage.is_upkeep for stage in taken)
        return TrainPlan(TrainWork(tuple(taken)), pause_serving=pause)

    def _max_pass_tokens(self, budget_s: float) -> int:
        """A new micro-step's passes no larger than one backward stage this step's training budget holds:
        samples together run faster per token, but a stage of a busy step's few milliseconds of slack
        must still fit in it, or training there stops altogether."""
        per_token_s = self.latency.coefficients()["train_backward_token"]
        if not math.isfinite(budget_s) or per_token_s <= 0:
            return MAX_PASS_TOKENS
        return max(1, min(MAX_PASS_TOKENS, int(budget_s / per_token_s)))

    def _max_train_tokens(self, wanted: int) -> int:
        """Training tokens the memory budget's training reservation holds now (KV pressure shrinks it)."""
        return wanted if self.train_memory is None else min(wanted, self.train_memory.max_tokens())

    def _fit_stages(self, stages: list[TrainStage], context: TrainContext, decision: TrainDecision,
                    upkeep_share: float = 1.0) -> list[TrainStage]:
        """The longest prefix of `stages` whose predicted cost fits its budget.

        Upkeep (scoring, evaluation) may use all of the slack; training stages only the policy's
        budget. With nothing to serve the first stage always goes, so work never stalls on a
        cautious latency estimate; a kind of stage never measured yet is tried alone now and then.
        """
        if context.has_inference and not context.inference_measured and math.isfinite(decision.budget_s):
            return []  # the streams' own step time is still a guess: a latency-bound policy adds nothing to it
        upkeep_s = max((context.slack_s + context.beside_s) * upkeep_share, decision.budget_s)
        taken: list[TrainStage] = []
        cost_s = 0.0  # the latency model is linear: a prefix costs the sum of its stages
        for stage in stages:
            limit_s = upkeep_s if stage.is_upkeep else decision.budget_s
            cost_s += self.latency.marginal_s(shape_of(0, 0, TrainWork((stage,))))
            if cost_s > limit_s:
                break
            taken.append(stage)
        first = stages[0] if stages else None
        if taken or first is None or not (first.is_upkeep or decision.budget_s > 0):
            return taken
        if not context.has_inference:
            return [first]
        first_shape = shape_of(0, 0, TrainWork((first,)))
        if not self.latency.is_measured(first_shape) and self._steps_since_probe >= PROBE_EVERY_STEPS:
            # The prior may overstate this kind of work many times over (a GPU, say) and a busy
            # server would then never run one to measure it: try one stage now and then.
            self._steps_since_probe = 0
            return [first]
        return taken

    def _context(self, inference: StepShape, limits: StepLimits) -> TrainContext:
        predicted_inference_s = self.latency.predict(inference) if inference.has_inference else 0.0
        return TrainContext(
            now_s=self.clock(),
            has_inference=inference.has_inference,
            predicted_inference_s=predicted_inference_s,
            beside_s=predicted_inference_s * self.beside_share,
            tpot_s=min(limits.tpot_s, self.slo.tpot_s),
            ttft_s=self.slo.ttft_s,
            num_trainable=self.source.num_trainable,
            num_samples_read=self.source.num_samples_read,
            drift=self.source.drift_ratio(),
            margin_s=self.latency.error_margin_s,
            inference_measured=self.latency.is_measured(inference),
            ttft_slack_s=limits.ttft_slack_s,
            converged=self.source.is_converged,
        )
