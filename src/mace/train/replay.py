"""Prioritised replay over a bounded window of recent samples, and the drift signal (tensor-free).

A sample's value is its loss under the serving adapter times a freshness decay; training draws
samples in value order. The drift signal is the running mean of incoming samples' loss relative to
its value at the last publish, or the gain the last held-out evaluation measured when that is larger:
about 1.0 when the served model is aligned, above when it drifted or is still catching up.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class TrainSample:
    sample_id: int
    token_ids: list[int]  # prompt + completion
    num_prompt_tokens: int
    created_at: float
    weight: float = 1.0
    loss: float = 1.0
    num_trained: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_key(self) -> tuple[int, ...]:
        return tuple(self.token_ids[: self.num_prompt_tokens])


@dataclass(frozen=True)
class TrainChunk:
    """A micro-batch for one iteration: these samples' forward and backward on the learner."""

    samples: list[TrainSample] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(sample.num_tokens for sample in self.samples)


class ReplayBuffer:
    def __init__(self, window: int, half_life_s: float) -> None:
        self._window = window
        self._half_life_s = half_life_s
        self._samples: OrderedDict[int, TrainSample] = OrderedDict()
        self._by_prompt: dict[tuple[int, ...], list[int]] = {}  # prompt -> ids of its samples, oldest first

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: TrainSample) -> None:
        """Add a newer sample; it supersedes older ones that give the same prompt another answer.

        A user who corrects the same question with a new answer has changed it: training on both would
        teach the old answer against the new one, and replay, which favours high loss, would pick the
        old one most once the new one is learned. The same answer again stays: it is confirmed.
        """
        same_prompt = self._by_prompt.setdefault(sample.prompt_key, [])
        if same_prompt and supersedes(sample, self._samples[same_prompt[-1]]):
            for superseded in same_prompt:
                del self._samples[superseded]
            same_prompt.clear()
        same_prompt.append(sample.sample_id)
        self._samples[sample.sample_id] = sample
        while len(self._samples) > self._window:
            _, evicted = self._samples.popitem(last=False)
            ids = self._by_prompt[evicted.prompt_key]
            ids.remove(evicted.sample_id)  # the oldest of its prompt, so the list's first
            if not ids:
                del self._by_prompt[evicted.prompt_key]

    def value(self, sample: TrainSample, now_s: float) -> float:
        return sample.loss * sample.weight * half_life_decay(max(0.0, now_s - sample.created_at), self._half_life_s)

    def pick(self, max_tokens: int, now_s: float, max_samples: int, at_least_one: bool = False) -> TrainChunk | None:
        """Highest-value samples whose tokens fit `max_tokens` (best fit: a big one never blocks smaller ones).

        `at_least_one`: take the most valuable sample even if it alone passes the budget, so that
        training always progresses when nothing else needs the device.
        """
        ranked = sorted(self._samples.values(), key=lambda s: self.value(s, now_s), reverse=True)
        chosen: list[TrainSample] = []
        room = max_tokens
        for sample in ranked:
            if len(chosen) == max_samples:
                break
            if sample.num_tokens <= room:
                chosen.append(sample)
                room -= sample.num_tokens
        if not chosen and at_least_one and ranked:
            chosen = ranked[:1]
        return TrainChunk(chosen) if chosen else None


def supersedes(newer: TrainSample, older: TrainSample) -> bool:
    """Whether `newer` answers `older`'s prompt differently (a user changed their answer)."""
    return newer.prompt_key == older.prompt_key and newer.token_ids != older.token_ids


def half_life_decay(age: float, half_life: float) -> float:
    """1 at age 0, halving every `half_life`."""
    return math.exp(-math.log(2) * age / half_life)


def recency_weighted_mean(losses: list[float], half_life: float) -> float:
    """The mean of `losses` (oldest first) with a weight that halves every `half_life` samples back
    from the newest: the publish gate judges a version on what users say now, and an answer they
    have since corrected (a fact that changed) counts less than its correction."""
    weights = [half_life_decay(len(losses) - 1 - index, half_life) for index in range(len(losses))]
    return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)


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
