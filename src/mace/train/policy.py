"""Retraining policies: how much of each engine iteration goes to training (tensor-free).

All policies run on the same code path (the scheduler asks, the runner trains) so that one trace
compares them fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from mace.config import TrainConfig


@dataclass(frozen=True)
class TrainContext:
    now_s: float
    has_inference: bool
    predicted_inference_s: float  # the latency model's prediction for this step's inference part
    tpot_s: float
    ttft_s: float
    num_trainable: int  # samples the trainer could draw now
    num_samples_read: int  # samples the trainer has read since the start
    drift: float  # running mean of intake loss / its value at the last publish (1.0: aligned)
    margin_s: float = 0.0  # headroom kept under the target for the latency model's error
    inference_measured: bool = True  # the latency model has measured this step's kind of inference
    # Least time to spare before a request waiting for its first token would miss its TTFT target,
    # its prompt and those ahead of it prefilled at the predicted rate (inf: none waits).
    ttft_slack_s: float = math.inf
    converged: bool = False  # the learner fits every sample it could train on (Trainer.is_converged)
    # Training time that runs beside this step's inference without lengthening it (a CPU's training
    # thread, engine/streams.py; 0 where training runs after the forward).
    beside_s: float = 0.0

    @property
    def slack_s(self) -> float:
        """Time this step can add beside its inference without passing the TPOT target, nor the TTFT
        target of a request still waiting for its first token (every second trained delays it too).

        With nothing to serve, a request may still arrive mid-step, so an idle step stays short
        enough (half the TTFT target, less the model's error) that its wait leaves room for the
        prefill; never under a tenth of the target, so that idle training always moves.
        """
        ttft_slack_s = self.ttft_slack_s - self.margin_s
        if not self.has_inference:
            return max(0.1 * self.ttft_s, min(0.5 * self.ttft_s - self.margin_s, ttft_slack_s))
        return max(0.0, min(self.tpot_s - self.predicted_inference_s - self.margin_s, ttft_slack_s))


@dataclass(frozen=True)
class TrainDecision:
    budget_s: float = 0.0  # predicted seconds of training stages this step may carry
    max_job_tokens: int = 0  # size of a new micro-step's sample set, in tokens
    pause_serving: bool = False


class RetrainPolicy(Protocol):
    name: str

    def decide(self, ctx: TrainContext) -> TrainDecision:
        """This iteration's training budget (0: none)."""
        ...

    def on_optimizer_step(self, now_s: float) -> None:
        """Called after each optimizer step."""
        ...


class NoTraining:
    name = "none"

    def decide(self, ctx: TrainContext) -> TrainDecision:
        return TrainDecision()

    def on_optimizer_step(self, now_s: float) -> None:
        return None


class ContinuousPolicy:
    """A whole micro-step of `chunk_tokens` in every iteration, whatever the load or drift."""

    name = "continuous"

    def __init__(self, config: TrainConfig) -> None:
        self._chunk_tokens = config.chunk_tokens

    def decide(self, ctx: TrainContext) -> TrainDecision:
        if not ctx.num_trainable:
            return TrainDecision()
        return TrainDecision(budget_s=math.inf, max_job_tokens=self._chunk_tokens)

    def on_optimizer_step(self, now_s: float) -> None:
        return None


class PeriodicPolicy:
    """Every `periodic_interval_s` or `periodic_min_samples` new samples, stop serving and train K steps."""

    name = "periodic"

    def __init__(self, config: TrainConfig) -> None:
        self._config = config
        self._round_started_s: float | None = None
        self._last_round_s = 0.0
        self._steps_left = 0
        self._samples_read_at_round = 0  # `num_samples_read` when the last round began

    def decide(self, ctx: TrainContext) -> TrainDecision:
        if self._steps_left == 0 and ctx.num_trainable and self._due(ctx):
            self._steps_left = self._config.periodic_steps
            self._last_round_s = ctx.now_s
            self._samples_read_at_round = ctx.num_samples_read
        if self._steps_left == 0:
            return TrainDecision()
        return TrainDecision(budget_s=math.inf, max_job_tokens=self._config.idle_chunk_tokens, pause_serving=True)

    def _due(self, ctx: TrainContext) -> bool:
        waited = ctx.now_s - self._last_round_s >= self._config.periodic_interval_s
        since_round = ctx.num_samples_read - self._samples_read_at_round
        return waited or since_round >= self._config.periodic_min_samples

    def on_optimizer_step(self, now_s: float) -> None:
        self._steps_left = max(0, self._steps_left - 1)


class MacePolicy:
    """Alignment-aware: training takes the latency slack in proportion to drift.

    intensity = (drift - 1) / (drift_full_ratio - 1), clipped to [0, 1]: near zero when the model is
    aligned with its users, all of the slack when it has drifted by `drift_full_ratio`.
    A micro-step's layer stages spread over as many iterations' slack as they need. Once the learner
    fits every sample it has, it rests: the drift says how far the served version is from users'
    data, and with nothing left to learn from that data more steps would only overfit it.
    """

    name = "mace"

    def __init__(self, config: TrainConfig) -> None:
        self._config = config

    def decide(self, ctx: TrainContext) -> TrainDecision:
        if not ctx.num_trainable or ctx.converged:
            return TrainDecision()
        intensity = min(1.0, max(0.0, (ctx.drift - 1.0) / (self._config.drift_full_ratio - 1.0)))
        return TrainDecision(budget_s=(ctx.slack_s + ctx.beside_s) * intensity,
                             max_job_tokens=self._config.max_sample_tokens)

    def on_optimizer_step(self, now_s: float) -> None:
        return None


def make_policy(config: TrainConfig) -> RetrainPolicy:
    policies: dict[str, RetrainPolicy] = {
        "none": NoTraining(),
        "continuous": ContinuousPolicy(config),
        "periodic": PeriodicPolicy(config),
        "mace": MacePolicy(config),
    }
    return policies[config.policy]
