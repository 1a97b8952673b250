"""Prioritised replay over a bounded window of recent samples (tensor-free).

A sample's value is its loss under the serving adapter times a freshness decay; training draws
samples in value order.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice


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
            _, evicted = self._samples.popitem(last=False)
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
                del self._samples[superseded]
            del self._by_prompt[sample.prompt_key]

    def newest(self, count: int) -> list[TrainSample]:
        """The `count` samples added last, oldest first."""
        return list(islice(reversed(self._samples.values()), count))[::-1]

    def all_fit(self, loss: float) -> bool:
        """Whether every sample's latest loss (its score, or its loss when last trained) is under `loss`."""
        return bool(self._samples) and all(sample.loss < loss for sample in self._samples.values())

    def untrained_weight(self) -> float:
        """The summed weight of samples not trained yet: what a lineage stands to learn (train/lineage.py)."""
        return sum(sample.weight for sample in self._samples.values() if sample.num_trained == 0)

    def value(self, sample: TrainSample, now_s: float) -> float:
        return sample.loss * sample.weight * half_life_decay(max(0.0, now_s - sample.created_at), self._half_life_s)

    def pick(self, max_tokens: int, now_s: float, max_samples: int, at_least_one: bool = False) -> MicroBatch | None:
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
        return MicroBatch(chosen) if chosen else None


def supersedes(newer: TrainSample, older: TrainSample) -> bool:
    """Whether `newer` answers `older`'s prompt differently (a user changed their answer)."""
    return newer.prompt_key == older.prompt_key and newer.token_ids != older.token_ids


def half_life_decay(age: float, half_life: float) -> float:
    """1 at age 0, halving every `half_life`."""
    return math.exp(-math.log(2) * age / half_life)
