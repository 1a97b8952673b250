"""Which lineage the learner trains next (train/fair_share.py), on a trainer with the tiny model."""

from __future__ import annotations

from mace.train import fair_share
from mace.train.lineage import Lineage
from mace.train.replay import TrainSample
from mace.train.trainer import Trainer


def _with_sample(lineage: Lineage, sample_id: int) -> None:
    lineage.intake.accept(TrainSample(sample_id, [5, 6, 7, 8], 2, created_at=0.0), held_out=False, loss=2.0)


def _aligned(lineage: Lineage) -> None:
    """Its last publish left the served version where users are: drift 1.0, no training under `mace`."""
    lineage.drift.on_publish(serving_loss=0.5, learner_loss=0.5)
    assert lineage.drift.ratio == 1.0


def test_an_aligned_lineage_never_holds_the_learner_while_a_drifted_one_waits(trainer: Trainer) -> None:
    # An aligned lineage furthest behind would be chosen at every step and given no budget by `mace`,
    # so never charged, and chosen again: on the tenants trace training stopped halfway through.
    alice, bob = trainer.resident("alice"), trainer.resident("bob")
    _with_sample(alice, 1)
    _with_sample(bob, 2)
    _aligned(alice)
    alice.was_eligible = bob.was_eligible = True
    alice.virtual_s, bob.virtual_s = 0.0, 100.0  # alice is furthest behind
    lineages = [alice, bob]
    assert bob.drift.ratio > 1.0
    assert fair_share.choose(lineages, trainer.focus, trainer.config) is bob
    assert trainer.drift_ratio() == bob.drift.ratio  # what sizes training's budget is bob's drift
    # A policy that trains whatever the drift takes the lineage furthest behind.
    continuous = trainer.config.model_copy(update={"policy": "continuous"})
    assert fair_share.choose(lineages, trainer.focus, continuous) is alice
    # With no drifted lineage left, none is chosen and `mace` reads the machine as aligned.
    _aligned(bob)
    assert trainer.shared.drift.ratio == 1.0 or not trainer.shared.is_trainable(trainer.config)
    assert fair_share.choose(trainer.lineages.values(), trainer.focus, trainer.config) is None
    assert trainer.drift_ratio() == 1.0
