"""The publish gate: its held-out mean weighs what users say now more than answers they have since
corrected, the held-out figures it reports follow the version that serves, a learner it keeps
holding back rests, and its retention guard holds back a candidate that forgets general answers."""

from __future__ import annotations

import math

from mace.train.intake import GateSlice
from mace.train.journal import NewSample
from mace.train.publish_gate import Evaluation, recency_weighted_mean
from mace.train.rehearsal import FIRST_ANCHOR_ID
from mace.train.replay import TrainSample
from mace.train.tasks import LossPurpose, LossResult
from mace.train.trainer import Trainer


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


def _evaluation(trainer: Trainer, serving_loss: float, learner_loss: float) -> Evaluation:
    """A finished held-out evaluation of one sample with these losses."""
    sample = TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)
    return Evaluation([sample], trainer.active_version, learner_losses={sample.sample_id: learner_loss},
                      serving_losses={sample.sample_id: serving_loss})


def test_the_serving_versions_held_out_loss_follows_the_version_that_serves(trainer: Trainer) -> None:
    trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.95))  # not better by the margin
    assert trainer.active_version == 0 and trainer.stats().serving_heldout_loss == 3.0
    trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.0))
    stats = trainer.stats()
    assert stats.active_version == 1
    assert stats.serving_heldout_loss == stats.learner_heldout_loss == 2.0  # v1 is the snapshot measured at 2.0
    trainer.activate(0)  # rolled back: the base model's loss on today's slice is not known yet
    assert math.isnan(trainer.stats().serving_heldout_loss)


def test_a_learner_held_back_again_and_again_rests_until_a_publish_or_new_samples(trainer: Trainer) -> None:
    for _ in range(trainer.config.rest_after_held_back):
        assert not trainer.is_converged
        trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.99))
    assert trainer.is_converged and trainer.stats().is_converged
    trainer.journal.append([NewSample("What is new?", "this")])
    assert trainer.ingest() == 1 and not trainer.is_converged  # the new sample may hold something to learn
    for _ in range(trainer.config.rest_after_held_back):
        trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.99))
    trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.0))
    assert trainer.active_version == 1 and not trainer.is_converged


def _anchors(count: int) -> list[TrainSample]:
    return [TrainSample(FIRST_ANCHOR_ID - index, [9, 10, 11, 12, 13], 2, created_at=0.0) for index in range(count)]


def _with_anchors(evaluation: Evaluation, anchors: list[TrainSample], base: float, candidate: float) -> Evaluation:
    evaluation.anchors = anchors
    evaluation.anchor_base_losses = {a.sample_id: base for a in anchors}
    evaluation.anchor_losses = {a.sample_id: candidate for a in anchors}
    return evaluation


def test_the_retention_guard_holds_back_a_better_candidate_that_forgets_general_answers(
        guarded_trainer: Trainer) -> None:
    trainer = guarded_trainer
    anchors = _anchors(3)
    guard = trainer.config.retention_guard
    assert guard > 0  # on by default
    forgetting = _with_anchors(_evaluation(trainer, serving_loss=3.0, learner_loss=1.0), anchors,
                               base=0.6, candidate=0.6 + guard * 1.5)
    assert trainer.gate.decide(forgetting) is None and trainer.active_version == 0
    stats = trainer.stats()
    assert stats.num_held_back_forgetting == 1 and math.isclose(stats.anchor_loss_rise, guard * 1.5)
    keeping = _with_anchors(_evaluation(trainer, serving_loss=3.0, learner_loss=1.0), anchors,
                            base=0.6, candidate=0.6 + guard / 2)
    assert trainer.gate.decide(keeping) == 1 and trainer.active_version == 1
    assert trainer.stats().num_held_back_forgetting == 1


def test_an_evaluation_asks_for_the_candidates_anchor_losses_and_version_0s_once(guarded_trainer: Trainer) -> None:
    trainer = guarded_trainer
    trainer.anchors.samples = _anchors(2)
    gate = trainer.gate
    held_out = GateSlice([TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)], held_out=True)

    def open_evaluation() -> list[LossPurpose]:
        trainer.learner.num_optimizer_steps += 1  # something new to judge
        gate.last_publish_s -= trainer.config.min_publish_interval_s
        requests = gate.open(held_out)
        for request in requests:  # every pass answers, as the trainer's upkeep would
            gate.record(LossResult(request, 1.0 if request.purpose is LossPurpose.ANCHOR else 0.5))
        return sorted(request.purpose for request in requests)

    assert open_evaluation() == sorted([LossPurpose.CANDIDATE, LossPurpose.SERVING, *[LossPurpose.ANCHOR] * 2,
                                        *[LossPurpose.ANCHOR_BASE] * 2])
    assert not gate.is_pending and math.isclose(gate.anchor_loss_rise, 0.5)
    # Version 0 does not change: its anchor losses are not asked again (the serving version's are, as
    # candidate and serving losses were equal, nothing published).
    assert LossPurpose.ANCHOR_BASE not in open_evaluation()


def test_after_a_publish_the_new_versions_losses_are_the_candidates_not_asked_again(trainer: Trainer) -> None:
    gate = trainer.gate
    first, second = (TrainSample(sample_id, [5, 6, 7, 8], 2, created_at=0.0) for sample_id in (1000, 1001))

    def evaluate(samples: list[TrainSample], candidate_loss: float) -> list[LossPurpose]:
        trainer.learner.num_optimizer_steps += 1  # something new to judge
        gate.last_publish_s -= trainer.config.min_publish_interval_s
        requests = gate.open(GateSlice(samples, held_out=True))
        for request in requests:
            gate.record(LossResult(request, candidate_loss if request.purpose is LossPurpose.CANDIDATE else 3.0))
        return [request.purpose for request in requests]

    assert evaluate([first], candidate_loss=1.0) == [LossPurpose.CANDIDATE, LossPurpose.SERVING]
    assert trainer.active_version == 1
    # Version 1 is that candidate: its loss on `first` is known; only the new sample is asked of it.
    assert evaluate([first, second], candidate_loss=0.5) == [LossPurpose.CANDIDATE, LossPurpose.CANDIDATE,
                                                             LossPurpose.SERVING]
    assert trainer.active_version == 2 and gate.serving_heldout_loss == 0.5
