"""The drift signal: rises with intake loss after a publish, and stays up while training still gains."""

from __future__ import annotations

import math

from mace.train.drift import UNALIGNED_RATIO, DriftSignal


def test_nothing_published_reads_unaligned_once_samples_arrive() -> None:
    signal = DriftSignal()
    assert signal.ratio == 1.0
    signal.observe(2.0)
    assert signal.ratio == UNALIGNED_RATIO


def test_intake_loss_above_the_published_level_raises_the_signal() -> None:
    signal = DriftSignal(smoothing=0.5)
    signal.on_publish(serving_loss=2.0, learner_loss=2.0)
    for _ in range(20):
        signal.observe(2.0)
    assert math.isclose(signal.ratio, 1.0, rel_tol=1e-6)
    for _ in range(20):
        signal.observe(4.0)  # users moved on: their samples cost the served model twice as much
    assert signal.ratio > 1.9


def test_a_publish_that_gained_a_lot_keeps_the_signal_up_until_an_evaluation_shows_no_gain() -> None:
    signal = DriftSignal(smoothing=0.5)
    signal.on_publish(serving_loss=3.0, learner_loss=1.5)
    for _ in range(20):
        signal.observe(1.5)  # new samples at the new version's level: the intake reading is back at 1
    assert math.isclose(signal.intake_ratio, 1.0, rel_tol=1e-3)
    assert math.isclose(signal.ratio, 2.0)  # but the last update halved the loss: keep learning
    signal.on_evaluation(serving_loss=1.5, learner_loss=1.49)
    assert signal.ratio < 1.02  # training stopped gaining: rest


def test_non_finite_evaluations_are_ignored() -> None:
    signal = DriftSignal()
    signal.on_publish(serving_loss=2.0, learner_loss=1.0)
    signal.on_evaluation(math.nan, 1.0)
    signal.on_evaluation(1.0, math.inf)
    assert signal.progress == 2.0


def test_intake_far_above_what_the_learner_fits_keeps_the_signal_up() -> None:
    signal = DriftSignal(smoothing=0.5)
    signal.on_publish(serving_loss=3.0, learner_loss=3.0)
    signal.on_evaluation(serving_loss=3.0, learner_loss=3.05)  # the held-out slice shows no gain
    for _ in range(20):
        signal.observe(3.0)
        signal.on_trained(3.0, num_trained_before=0)  # a first pass: the sample's loss before any update
        signal.on_trained(1.0, num_trained_before=1)  # but the learner fits what it trained three times better
    assert math.isclose(signal.room, 3.0, rel_tol=1e-3) and signal.ratio >= 2.99
    for _ in range(20):
        signal.on_trained(3.0, num_trained_before=2)  # it fits seen samples no better than new ones: rest
    assert signal.ratio < 1.01
    signal.on_trained(math.nan, num_trained_before=1)
    assert signal.trained_loss is not None and math.isfinite(signal.trained_loss)


def test_a_version_that_answers_nearly_surely_rests_even_if_a_tiny_loss_still_halves() -> None:
    plain, floored = DriftSignal(smoothing=0.5), DriftSignal(smoothing=0.5, loss_floor=0.1)
    for signal in (plain, floored):
        signal.on_publish(serving_loss=0.004, learner_loss=0.002)  # a fact learned, then learned "twice as well"
        for _ in range(20):
            signal.observe(0.004)
    assert plain.ratio >= 1.99  # without a floor, overfitting one fact reads as strong drift
    assert floored.ratio < 1.03
    floored.observe(3.0)  # a new fact arrives: the floor does not hide real drift
    assert floored.ratio > 5
