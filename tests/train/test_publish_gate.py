"""The publish gate's held-out mean: what users say now weighs more than answers they have since corrected."""

from __future__ import annotations

import math

from mace.train.replay import recency_weighted_mean


def test_a_sample_one_half_life_back_weighs_half_the_newest() -> None:
    assert math.isclose(recency_weighted_mean([1.0, 0.0], half_life=1.0), 1.0 / 3.0)
    assert math.isclose(recency_weighted_mean([2.0, 2.0, 2.0], half_life=4.0), 2.0)


def test_a_learner_that_learned_a_changed_fact_wins_the_gate_the_plain_mean_would_refuse() -> None:
    # Twelve older held-out answers the serving version knows (a fact since changed) and four newer
    # corrections it gets wrong; the learner has learned the corrections, at some cost on the old answers.
    serving = [1.0] * 12 + [3.0] * 4
    learner = [1.8] * 12 + [1.5] * 4
    assert sum(learner) / len(learner) > sum(serving) / len(serving)
    assert recency_weighted_mean(learner, half_life=4.0) < recency_weighted_mean(serving, half_life=4.0)


def test_a_long_half_life_is_the_plain_mean() -> None:
    serving = [1.0] * 12 + [3.0] * 4
    assert math.isclose(recency_weighted_mean(serving, half_life=1e9), sum(serving) / len(serving), rel_tol=1e-6)
