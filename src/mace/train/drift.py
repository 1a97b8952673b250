"""The drift signal: how far the served model is from its users' data (tensor-free).

The engine's retraining policy reads it each step (train/policy.py) to size training's share of the
slack: about 1.0 when the served model is aligned, above when it drifted or is still catching up.
"""

from __future__ import annotations

import math

UNALIGNED_RATIO = 10.0


class DriftSignal:
    """How far the served model is from its users' data, as a ratio (1.0: aligned, nothing to learn).

    Three readings, the largest wins:
    - intake: the running mean of incoming samples' loss under the serving version, relative to the
      held-out loss of the version at its publish. It rises when users' data moves away from what the
      model learned (new facts, a new policy).
    - progress: the serving version's held-out loss relative to the learner's at the last evaluation
      of the publish gate. Right after a publish the intake reading is back near 1.0 even when the
      model has only half caught up; as long as training keeps gaining on held-out samples, its
      updates still matter, and once an evaluation shows no gain the model has converged and rests.
    - room: the intake loss relative to what the learner fits, its loss on samples it is training
      again (a first pass reads a new sample's loss before any update on it, and prioritised replay
      picks new samples first, so counting first passes would only echo the intake loss). While
      users keep sending corrections the served model predicts far worse than the learner fits what
      it has seen, there is something left to learn even if the held-out slice does not show it yet
      (facts that are asked again); when new samples are as predictable as trained ones, it is 1.

    Every ratio compares losses plus `loss_floor`: once a version answers what users asked almost
    surely (per-token loss near the floor), a further halving of an already tiny loss is no drift, and
    training on it would only overfit a few samples at the cost of everything else the model knew.
    """

    def __init__(self, smoothing: float = 0.2, loss_floor: float = 0.0) -> None:
        self._smoothing = smoothing
        self._floor = loss_floor
        self.mean_loss: float | None = None
        self.baseline_loss: float | None = None
        self.progress = 1.0
        self.trained_loss: float | None = None  # running mean of the learner's loss on samples it trained before

    def observe(self, intake_loss: float) -> None:
        self.mean_loss = self._running_mean(self.mean_loss, intake_loss)

    def on_trained(self, loss: float, num_trained_before: int) -> None:
        """A training sample's loss under the learner, before the update it feeds; only a sample the
        learner has trained on before says what it fits."""
        if num_trained_before > 0:
            self.trained_loss = self._running_mean(self.trained_loss, loss)

    def _running_mean(self, mean: float | None, value: float) -> float | None:
        """`mean` moved towards `value` (a non-finite value is ignored)."""
        if not math.isfinite(value):
            return mean
        return value if mean is None else mean + self._smoothing * (value - mean)

    def on_evaluation(self, serving_loss: float, learner_loss: float) -> None:
        """The publish gate measured both versions on the held-out slice."""
        if math.isfinite(serving_loss) and math.isfinite(learner_loss) and learner_loss + self._floor > 0:
            self.progress = max(1.0, self._ratio(serving_loss, learner_loss))

    def on_publish(self, serving_loss: float, learner_loss: float) -> None:
        """The new version's held-out loss becomes the reference; the loss users saw until now is the
        current level, so a publish that gained a lot keeps training going and a marginal one lets it rest."""
        self.baseline_loss = learner_loss
        self.mean_loss = serving_loss
        self.on_evaluation(serving_loss, learner_loss)

    @property
    def intake_ratio(self) -> float:
        if self.mean_loss is None:
            return 1.0
        if self.baseline_loss is None or self.baseline_loss + self._floor <= 0:
            return UNALIGNED_RATIO  # nothing published yet: every user sample is news
        return self._ratio(self.mean_loss, self.baseline_loss)

    @property
    def room(self) -> float:
        if self.mean_loss is None or self.trained_loss is None or self.trained_loss + self._floor <= 0:
            return 1.0
        return self._ratio(self.mean_loss, self.trained_loss)

    def _ratio(self, loss: float, reference: float) -> float:
        return (loss + self._floor) / (reference + self._floor)

    @property
    def ratio(self) -> float:
        return max(self.intake_ratio, self.progress, self.room)
