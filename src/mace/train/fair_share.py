"""Which lineage the one learner trains next: stride scheduling by expected gain (tensor-free).

Each trainable lineage (samples left, not resting, and drifted under `mace`) has a share of
training time: its expected gain (drift times the weight of its samples not trained yet nor fit,
`Lineage.expected_gain`) over all trainable lineages' gain, but never under half an equal share, so a
tenant with pending samples always gets some time. Its virtual time is the seconds it trained divided
by its share; the one furthest behind goes next. A lineage that has just become trainable starts level
with the others rather than with the time it missed.
"""

from __future__ import annotations

from collections.abc import Iterable

from mace.config import TrainConfig
from mace.train.lineage import Lineage


def choose(lineages: Iterable[Lineage], current: Lineage, config: TrainConfig) -> Lineage | None:
    """The lineage to train next (`current` wins ties: switching costs a copy); None: none trainable."""
    every = list(lineages)
    trainable = [lineage for lineage in every if lineage.is_trainable(config) and wants_training(lineage, config)]
    for lineage in every:
        if lineage not in trainable:
            lineage.was_eligible = False
    if not trainable:
        return None
    level = min((lineage.virtual_s for lineage in trainable if lineage.was_eligible), default=0.0)
    gains = [lineage.expected_gain(config) for lineage in trainable]
    total = sum(gains)
    floor = 0.5 / len(trainable)
    for lineage, gain in zip(trainable, gains, strict=True):
        if not lineage.was_eligible:
            lineage.virtual_s, lineage.was_eligible = max(lineage.virtual_s, level), True
        lineage.share = max(floor, gain / total if total > 0 else 1.0 / len(trainable))
    return min(trainable, key=lambda lineage: (lineage.virtual_s, lineage is not current))


def wants_training(lineage: Lineage, config: TrainConfig) -> bool:
    """Whether the policy gives `lineage` any training when it is chosen. `mace` trains a lineage in
    proportion to its drift (train/policy.py): one that reads aligned gets no budget, so it is never
    charged, and, furthest behind, it was chosen at every step while every other tenant's new facts
    waited (training stopped halfway through the tenants trace)."""
    return config.policy != "mace" or lineage.drift.ratio > 1.0


def charge(lineage: Lineage, seconds: float) -> None:
    """`lineage` trained for `seconds`: its virtual time moves on by them over its share."""
    lineage.train_seconds_total += seconds
    lineage.virtual_s += seconds / lineage.share
