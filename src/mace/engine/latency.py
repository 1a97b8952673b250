"""Online latency model: predicts a step's wall time from its token counts.

    step_s ≈ base + a·prefill_tokens + b·decode_tokens
             + c·train_forward_tokens + d·train_backward_tokens + e·train_head_tokens

Training features count tokens per decoder-layer stage (a sample of 64 tokens whose forward runs
through 3 layers this step adds 192 forward tokens); forward-only upkeep (scoring, evaluation) is
staged the same way and counts with the training forward (a little cautious: it keeps no graph).

Fitted by least squares over a sliding window of measured steps (non-negative coefficients), so it
follows the machine as load and thermal state change. Before enough data it uses cautious priors.

A step planned to end exactly at the TPOT target misses it whenever the machine is a little slower
than predicted, so planners keep `error_margin_s` free: the 90th percentile of how much the steps in
the window overrun the fitted model (the machine's noise, not the priors' first guesses).
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

    def features(self) -> list[float]:
        return [1.0, float(self.num_prefill_tokens), float(self.num_decode_tokens),
                float(self.num_train_forward_tokens), float(self.num_train_backward_tokens),
                float(self.num_train_head_tokens)]

    @property
    def has_inference(self) -> bool:
        return self.num_prefill_tokens + self.num_decode_tokens > 0


ERROR_QUANTILE = 0.9


class LatencyModel:
    def __init__(self, window: int = 512, refit_every: int = 16,
                 prior: tuple[float, ...] = (0.005, 0.002, 0.004, 0.0002, 0.0003, 0.003)) -> None:
        # Priors err on the slow side (about 3x the default model on a 2-core CPU): until measured,
        # training takes less slack than it could rather than more.
        self._samples: deque[tuple[list[float], float]] = deque(maxlen=window)
        self._coef = np.array(prior, dtype=np.float64)
        self._refit_every = refit_every
        self._since_fit = 0
        self._fitted = np.zeros(len(prior), dtype=bool)  # columns whose coefficient came from measurements
        self.error_margin_s = 0.0
        self.last_error_s = 0.0

    def predict(self, shape: StepShape) -> float:
        return float(np.dot(self._coef, shape.features()))

    def is_measured(self, shape: StepShape) -> bool:
        """Whether every kind of work in `shape` has a fitted coefficient (not a prior)."""
        features = np.array(shape.features()[1:]) != 0
        return bool(self._fitted[1:][features].all())

    def marginal_s(self, shape: StepShape) -> float:
        """What `shape`'s tokens add to a step that runs anyway (the prediction without the base)."""
        return self.predict(shape) - float(self._coef[0])

    def observe(self, shape: StepShape, measured_s: float) -> None:
        self.last_error_s = measured_s - self.predict(shape)
        self._samples.append((shape.features(), measured_s))
        self._since_fit += 1
        if self._since_fit >= self._refit_every and len(self._samples) >= 8:
            self._fit()

    def _fit(self) -> None:
        self._since_fit = 0
        x = np.array([f for f, _ in self._samples])
        y = np.array([t for _, t in self._samples])
        # Columns never exercised in the window keep their prior instead of collapsing to zero.
        used = np.asarray(x.any(axis=0), dtype=bool)
        used[0] = True
        coef, *_ = np.linalg.lstsq(x[:, used], y, rcond=None)
        updated = self._coef.copy()
        updated[used] = np.maximum(coef, 0.0)
        self._coef = updated
        self._fitted |= used
        self.error_margin_s = max(0.0, float(np.quantile(y - x @ updated, ERROR_QUANTILE)))
