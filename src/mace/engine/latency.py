"""Online latency model: predicts a step's wall time (the whole engine iteration: planning, the
forward, bookkeeping and the step boundary, what a stream waits between two tokens) from its token counts.

    step_s ≈ base + f·[the step runs an inference forward] + h·[that forward has two tokens or more]
             + a·prefill_tokens + b·decode_tokens
             + c·train_forward_tokens + d·train_backward_tokens + e·train_head_tokens
             + g·prefill_chunks

An inference forward has a fixed cost of its own (every decoder layer runs, whatever the batch) that
a training-only step does not pay, so it is a feature, not folded into the per-token terms. A forward
of one token is a matrix-vector product per linear layer; from two tokens on it is a matrix product,
which on a CPU in float32 costs a step of its own (SmolLM2 on 2 cores: one decode 95-105 ms, two
170-190 ms, then about 5 ms per further decode; in bf16 with AMX no such step): fitted as one line,
the one-decode steps and the batched ones pull the base between them and both are mispredicted. So has
each prompt chunk (its attention runs on its own, and a prompt's first chunk comes with the work of
its arrival), which a per-token prefill term would spread wrongly over short and long prompts.
Training features count tokens per decoder-layer stage (a sample of 64 tokens whose forward runs
through 3 layers this step adds 192 forward tokens); forward-only upkeep (scoring, evaluation) is
staged the same way and counts with the training forward (a little cautious: it keeps no graph).

Fitted by least squares over a sliding window of measured steps (coefficients kept non-negative by
refitting without the columns that came out negative), so it follows the machine as load and
thermal state change. Before enough data it uses cautious priors.

A step planned to end exactly at the TPOT target misses it whenever the machine is a little slower
than predicted, so planners keep `error_margin_s` free. It has three parts:
- the recent overrun: a running mean of how much the last steps overran the model. Overruns come in
  runs (a client burst or another process on the shared cores slows several steps in a row: on the
  default model, one step's overrun correlates 0.7 with the next's), so the step after a slow one is
  planned shorter;
- the 95th percentile of what is left of the overrun once the recent one is taken off, over the
  window's steps that served requests (the machine's noise as the streams feel it; training-only
  steps are short and regular, and would hide it);
- `TpotGuard`'s extra, learned from outcomes: each finished request that still missed its TPOT target
  raises it, each that met it lowers it a little, so that about 1% miss whatever the model leaves out.
`tail_margin_s` is the same with the 99th percentile, for a gap that a request's TPOT rests on alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepShape:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_train_forward_tokens: int = 0
    num_train_backward_tokens: int = 0
    num_train_head_tokens: int = 0
    num_prefill_chunks: int = 0  # prompts (or parts of one) in the step: each attends on its own

    def features(self) -> list[float]:
        batched = self.num_prefill_tokens + self.num_decode_tokens >= 2
        return [1.0, 1.0 if self.has_inference else 0.0, 1.0 if batched else 0.0, float(self.num_prefill_tokens),
                float(self.num_decode_tokens), float(self.num_train_forward_tokens),
                float(self.num_train_backward_tokens), float(self.num_train_head_tokens),
                float(self.num_prefill_chunks)]

    @property
    def has_inference(self) -> bool:
        return self.num_prefill_tokens + self.num_decode_tokens > 0


ERROR_QUANTILE = 0.95
TAIL_QUANTILE = 0.99
RECENT_WEIGHT = 0.3  # of the newest step in the running mean of overruns
MIN_INFERENCE_SAMPLES = 8  # steps with inference in the window before the margin is read from them alone
FEATURE_NAMES = ("base", "forward", "batched_forward", "prefill_token", "decode_token", "train_forward_token",
                 "train_backward_token", "train_head_token", "prefill_chunk")
FORWARD = 1  # the column of the inference-forward indicator
BATCHED = 2  # the column of the two-tokens-or-more indicator
FIXED = BATCHED + 1  # the step's fixed costs come first: what a step pays whatever its token counts
DECODE = FEATURE_NAMES.index("decode_token")


class TpotGuard:
    """Extra margin from outcomes: a running quantile estimate (stochastic approximation) that settles
    where `miss_rate` of finished requests miss their TPOT target.

    Steps and the ceiling are fractions of `reference_s`, the tightest TPOT target served: the margin is
    subtracted from that target's steps, so a relaxed class's miss must not move it by its own, larger
    target (a batch request missing 2 s would otherwise take the whole 0.35 s of an interactive one).
    """

    def __init__(self, reference_s: float = 0.35, miss_rate: float = 0.01, step_fraction: float = 0.1,
                 max_fraction: float = 0.25, near_miss_fraction: float = 0.05) -> None:
        self.reference_s = reference_s
        # A request within this share of its target counts as a miss: clients time tokens after the
        # event loop and the socket, a few milliseconds the engine's clock never sees.
        self.near_miss_fraction = near_miss_fraction
        self.miss_rate = miss_rate
        self.step_fraction = step_fraction  # of the reference target, added per miss
        self.max_fraction = max_fraction  # never more than this share of the reference target
        self.reset()

    def reset(self) -> None:
        self.extra_s = 0.0
        self.num_missed = 0
        self.num_met = 0

    def observe(self, tpot_s: float, target_s: float) -> None:
        step_s = self.step_fraction * self.reference_s
        if tpot_s > target_s * (1.0 - self.near_miss_fraction):
            self.num_missed += 1
            self.extra_s = min(self.extra_s + step_s, self.max_fraction * self.reference_s)
        else:
            self.num_met += 1
            self.extra_s = max(0.0, self.extra_s - step_s * self.miss_rate / (1.0 - self.miss_rate))


class RequestBias:
    """The `quantile` of how much finished requests' TPOT exceeded the mean predicted time of the steps
    they decoded in, over the last `window` requests (0 until `min_requests` finished, never negative)."""

    def __init__(self, window: int = 64, quantile: float = 0.9, min_requests: int = 4) -> None:
        self.quantile, self.min_requests = quantile, min_requests
        self._biases: deque[float] = deque(maxlen=window)

    def reset(self) -> None:
        self._biases.clear()

    def observe(self, tpot_s: float, predicted_step_s: float) -> None:
        self._biases.append(tpot_s - predicted_step_s)

    @property
    def extra_s(self) -> float:
        if len(self._biases) < self.min_requests:
            return 0.0
        return max(0.0, float(np.quantile(np.array(self._biases), self.quantile)))


class LatencyModel:
    def __init__(self, window: int = 512, refit_every: int = 16,
                 prior: tuple[float, ...] = (0.005, 0.1, 0.0, 0.01, 0.02, 0.0005, 0.001, 0.01, 0.05)) -> None:
        # Priors err on the slow side (a little slower than the default model on a 2-core CPU): until
        # measured, training takes less slack than it could rather than more.
        self._samples: deque[tuple[list[float], float]] = deque(maxlen=window)
        self._coef = np.array(prior, dtype=np.float64)
        self._refit_every = refit_every
        self._since_fit = 0
        self._fitted = np.zeros(len(prior), dtype=bool)  # columns whose coefficient came from measurements
        self.model_margin_s = 0.0
        self.model_tail_margin_s = 0.0
        self.guard = TpotGuard()
        self.last_error_s = 0.0
        self.recent_error_s = 0.0  # running mean of the last steps' overruns (negative: they ran fast)
        # How far requests that shared no step with training were off the predicted steps (`mean_margin_s`).
        self.request_bias = RequestBias()

    @property
    def mean_margin_s(self) -> float:
        """Headroom for a request's TPOT, the mean of its steps (sizes the decode batch): how much the
        recent requests' TPOT exceeded the model's own prediction of their steps (`RequestBias`). One
        step's noise, which the 95th-percentile overrun covers, averages out over an answer; under an
        overload whose noise comes from outside the batch (clients on the same cores), the percentile
        grows with it and would shrink the batch, which cannot help: FCFS met the 0.2 s target for 90%
        of requests where the cap had fallen to 1 (docs/results/slo.md).

        A bias, not a count of misses: where a single stream's step is already near the target, every
        request misses at any batch size, and a margin that grows with misses shrank the batch to one
        request while chat queued for seconds and was refused (one fact learned beside chat,
        docs/results/train/learn.md). The bias only says how far the model's step times are from what
        streams see, which a batch of one would see too, so the cap stays where the model puts it.
        Learned only from requests that shared no step with training: training takes the slack up to
        the target, and what it overruns is given back from training's budget (`error_margin_s`)."""
        return self.request_bias.extra_s

    @property
    def error_margin_s(self) -> float:
        """Headroom planners keep under a TPOT target for the next step: the window's noise, the guard's
        extra and the recent overrun."""
        return self.model_margin_s + self.guard.extra_s + max(0.0, self.recent_error_s)

    @property
    def tail_margin_s(self) -> float:
        """Headroom for a step that must rarely overrun: a request's only gap between tokens so far."""
        return self.error_margin_s + self.model_tail_margin_s - self.model_margin_s

    def predict(self, shape: StepShape) -> float:
        return float(np.dot(self._coef, shape.features()))

    def coefficients(self) -> dict[str, float]:
        """The fitted (or prior) seconds per unit of each feature, by name, for logs."""
        return {name: round(float(c), 6) for name, c in zip(FEATURE_NAMES, self._coef, strict=True)}

    def is_measured(self, shape: StepShape) -> bool:
        """Whether every kind of work in `shape` has a fitted coefficient (not a prior)."""
        features = np.array(shape.features()[1:]) != 0
        return bool(self._fitted[1:][features].all())

    def marginal_s(self, shape: StepShape) -> float:
        """What `shape`'s training and prompt tokens add to a step that runs anyway (no base, no forward,
        no batched forward's step)."""
        return self.predict(shape) - float(np.dot(self._coef[:FIXED], shape.features()[:FIXED]))

    def observe(self, shape: StepShape, measured_s: float) -> None:
        self.last_error_s = measured_s - self.predict(shape)
        self.recent_error_s += RECENT_WEIGHT * (self.last_error_s - self.recent_error_s)
        self._samples.append((shape.features(), measured_s))
        self._since_fit += 1
        if self._since_fit >= self._refit_every and len(self._samples) >= 8:
            self._fit()

    def forget_samples(self) -> None:
        """Drop the measured steps (keeping the coefficients): the next fit reads only later steps."""
        self._samples.clear()
        self._since_fit = 0
        self.recent_error_s = 0.0

    def refit(self) -> None:
        """Fit now on what the window holds (the warm-up's steps, say), not at the next `refit_every`."""
        if self._samples:
            self._fit()

    def _fit(self) -> None:
        self._since_fit = 0
        x = np.array([f for f, _ in self._samples])
        y = np.array([t for _, t in self._samples])
        # Columns never exercised in the window keep their prior instead of collapsing to zero.
        used = np.asarray(x.any(axis=0), dtype=bool)
        used[0] = True
        # An indicator set on every step the column before it is set is the same column: its cost is
        # already in that one (every step served: the base holds the forward's cost; every forward had
        # two tokens or more: the forward's cost holds the matrix product's step).
        collinear = [column for column, before in ((FORWARD, 0), (BATCHED, FORWARD))
                     if used[column] and np.array_equal(x[:, column], x[:, before])]
        updated = self._coef.copy()
        for column in collinear:
            used[column] = False
            updated[column] = 0.0
        if self._fitted[DECODE] and len(np.unique(x[x[:, DECODE] > 0, DECODE])) < 2:
            # Every decoding step in the window ran the same number of decodes (the decode cap at 1, say):
            # the window cannot tell a decode's cost from the step's, and a fit splits the step between
            # them, so a second decode looks as dear as half a step and the cap stays where it is. The
            # per-decode cost keeps its last fit; the fixed costs take up what changed.
            fitted_y = y - x[:, DECODE] * updated[DECODE]
            used[DECODE] = False
        else:
            fitted_y = y
        active = used.copy()
        coef = _non_negative_fit(x, fitted_y, active)
        if active[BATCHED] and not _is_significant(x, fitted_y, active, coef, BATCHED):
            # Kept non-negative, a step that is not there would still come out a little positive from the
            # noise of a few one-token steps (bf16 here), and every batched step would carry it.
            active[BATCHED] = False
            coef = _non_negative_fit(x, fitted_y, active)
        updated[used] = 0.0
        if active.any():
            updated[active] = coef
        self._coef = updated
        self._fitted |= used
        self._fitted[collinear] = True
        residuals = _less_recent_overrun(y - x @ updated)
        serving = x[:, FORWARD] > 0
        if serving.sum() >= MIN_INFERENCE_SAMPLES:
            residuals = residuals[serving]
        self.model_margin_s = max(0.0, float(np.quantile(residuals, ERROR_QUANTILE)))
        self.model_tail_margin_s = max(self.model_margin_s, float(np.quantile(residuals, TAIL_QUANTILE)))


def _non_negative_fit(x: np.ndarray, y: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Least squares over the `active` columns, refit without those that come out negative (`active`
    is updated in place); the coefficients of the columns still active."""
    coef = np.zeros(0)
    while active.any():
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        negative = coef < 0
        if not negative.any():
            break
        active[np.flatnonzero(active)[negative]] = False
    return coef


def _is_significant(x: np.ndarray, y: np.ndarray, active: np.ndarray, coef: np.ndarray, column: int) -> bool:
    """Whether `column`'s fitted coefficient is at least twice its standard error."""
    columns = np.flatnonzero(active)
    design = x[:, columns]
    degrees = len(y) - len(columns)
    if degrees <= 0:
        return False
    variance = float(np.sum((y - design @ coef) ** 2)) / degrees
    covariance = variance * np.linalg.pinv(design.T @ design)
    index = int(np.flatnonzero(columns == column)[0])
    return bool(coef[index] > 2.0 * np.sqrt(max(covariance[index, index], 0.0)))


def _less_recent_overrun(residuals: np.ndarray) -> np.ndarray:
    """Each step's overrun less what the running mean of the steps before it already foresaw (as
    `error_margin_s` does live), in window order."""
    left = np.empty_like(residuals)
    recent = 0.0
    for index, residual in enumerate(residuals):
        left[index] = residual - max(0.0, recent)
        recent += RECENT_WEIGHT * (residual - recent)
    return left
