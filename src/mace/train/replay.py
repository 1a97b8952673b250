"""Prioritised replay over a bounded window of recent samples (tensor-free).

A sample's value is its loss under the serving adapter times a freshness decay; training draws
samples in value order. A sample's loss is measured again only when it is trained, so one the
learner fitted and then forgot (training on other answers moved the weights) would keep its low
loss and never come back: one picked sample in `REVISIT_EVERY` is the one trained longest ago, whose
loss is then measured again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

REVISIT_EVERY = 4


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
class MicroBatch:
    """The samples of one micro-step: their forward and backward on the learner (a "chunk" is a
    request's share of an engine step, `plan.ScheduledChunk`)."""

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
        self._picked: OrderedDict[int, None] = OrderedDict()  # ids of samples picked before, the longest ago first
        self._picked_since_revisit = 0

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: TrainSample) -> None:
        """Add a newer sample; it supersedes older ones that give the same prompt another answer.

        A user who corrects the same question with a new answer has changed it: training on both would
        teach the old answer against the new one, and replay, which favours high loss, would pick the
        old one most once the new one is learned. The same answer again stays: it is confirmed.
        """
        self.drop_superseded(sample)
        self._by_prompt.setdefault(sample.prompt_key, []).append(sample.sample_id)
        self._samples[sample.sample_id] = sample
        while len(self._samples) > self._window:
            evicted = self._remove(next(iter(self._samples)))
            ids = self._by_prompt[evicted.prompt_key]
            ids.remove(evicted.sample_id)  # the oldest of its prompt, so the list's first
            if not ids:
                del self._by_prompt[evicted.prompt_key]

    def teaches(self, prompt_key: tuple[int, ...]) -> bool:
        """Whether a sample in the window answers this very prompt."""
        return prompt_key in self._by_prompt

    def drop_superseded(self, sample: TrainSample) -> None:
        """Drop the samples that `sample` gives another answer (`add`'s, and a held-out sample's, which is
        never added): the user changed it, and training on the old answer would teach against it."""
        same_prompt = self._by_prompt.get(sample.prompt_key)
        if same_prompt and supersedes(sample, self._samples[same_prompt[-1]]):
            for superseded in same_prompt:
                self._remove(superseded)
            del self._by_prompt[sample.prompt_key]

    def _remove(self, sample_id: int) -> TrainSample:
        self._picked.pop(sample_id, None)
        return self._samples.pop(sample_id)

    def newest(self, count: int) -> list[TrainSample]:
        """The `count` samples added last, oldest first."""
        return list(islice(reversed(self._samples.values()), count))[::-1]

    def all_fit(self, loss: float) -> bool:
        """Whether every sample's latest loss (its score, or its loss when last trained) is under `loss`."""
        return bool(self._samples) and all(sample.loss < loss for sample in self._samples.values())

    def has_unlearned(self, fit_loss: float) -> bool:
        """Whether a sample never trained is not fit yet (`is_unlearned`)."""
        return any(is_unlearned(sample, fit_loss) for sample in self._samples.values())

    def unlearned_weight(self, fit_loss: float) -> float:
        """The summed weight of the samples never trained and not fit yet: what a lineage stands to learn
        (train/lineage.py)."""
        return sum(sample.weight for sample in self._samples.values() if is_unlearned(sample, fit_loss))

    def value(self, sample: TrainSample, now_s: float) -> float:
        return sample.loss * sample.weight * half_life_decay(max(0.0, now_s - sample.created_at), self._half_life_s)

    def pick(self, max_tokens: int, now_s: float, max_samples: int, at_least_one: bool = False) -> MicroBatch | None:
        """Highest-value samples whose tokens fit `max_tokens` (best fit: a big one never blocks smaller ones).

        `at_least_one`: take the most valuable sample even if it alone passes the budget, so that
        training always progresses when nothing else needs the device.
        """
        ranked = sorted(self._samples.values(), key=lambda s: self.value(s, now_s), reverse=True)
        revisit = None
        if self._picked and self._picked_since_revisit >= REVISIT_EVERY - 1:
            revisit = self._samples[next(iter(self._picked))]
            ranked = [revisit, *(sample for sample in ranked if sample is not revisit)]
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
        self._note_picked(chosen, revisited=revisit is not None and revisit in chosen)
        return MicroBatch(chosen) if chosen else None

    def _note_picked(self, chosen: list[TrainSample], revisited: bool) -> None:
        """A revisit that did not fit the micro-step's tokens is tried again at the next pick."""
        self._picked_since_revisit = 0 if revisited else self._picked_since_revisit + len(chosen)
        for sample in chosen:
            self._picked[sample.sample_id] = None
            self._picked.move_to_end(sample.sample_id)


def is_unlearned(sample: TrainSample, fit_loss: float) -> bool:
    """Never trained, and its score (its loss under the version served when it came) is `fit_loss` or
    more. A user who repeats an answer already learned sends a sample scored near zero: it has nothing
    to teach, and replay, which ranks by loss, would never pick it, so counting it as untrained kept its
    lineage training on fitted samples, at twice its share, while other tenants' new facts waited."""
    return sample.num_trained == 0 and not sample.loss < fit_loss


def supersedes(newer: TrainSample, older: TrainSample) -> bool:
    """Whether `newer` answers `older`'s prompt differently (a user changed their answer)."""
    return newer.prompt_key == older.prompt_key and newer.token_ids != older.token_ids


def half_life_decay(age: float, half_life: float) -> float:
    """1 at age 0, halving every `half_life`."""
    return math.exp(-math.log(2) * age / half_life)
