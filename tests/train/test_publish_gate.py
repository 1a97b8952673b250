"""The publish gate: its held-out mean weighs what users say now more than answers they have since
corrected, the held-out figures it reports follow the version that serves, a learner it keeps
holding back rests, and its retention guard holds back a candidate that forgets general answers."""

from __future__ import annotations

import dataclasses
import math

from mace.train import publish_gate
from mace.train.intake import GateSlice
from mace.train.journal import NewSample
from mace.train.publish_gate import Evaluation, recency_weighted_mean
from mace.train.rehearsal import ANCHOR_QUESTIONS, FIRST_ANCHOR_ID, anchor_prompts
from mace.train.replay import TrainSample
from mace.train.scope import prompt_words
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


def test_a_learner_does_not_rest_while_a_sample_was_never_trained(trainer: Trainer) -> None:
    """An acknowledged sample is learned from at least once: a tenant resting past the resident bound
    would otherwise leave memory with it untrained (train/residency.py brings it back only once)."""
    untrained = TrainSample(7, [5, 6, 7, 8], 2, created_at=0.0)
    trainer.intake.accept(untrained, held_out=False, loss=2.0)  # scored, not trained yet
    for _ in range(trainer.config.rest_after_held_back + 1):
        trainer.gate.decide(_evaluation(trainer, serving_loss=3.0, learner_loss=2.99))
    assert not trainer.is_converged and trainer.shared.is_trainable(trainer.config)
    untrained.num_trained = 1  # what `Trainer.run_work` records after its micro-step
    assert trainer.is_converged


def test_a_repeat_of_an_answer_already_fit_neither_keeps_a_learner_awake_nor_raises_its_gain(
        trainer: Trainer) -> None:
    """A user who repeats an answer the served version already gives sends a sample scored near zero:
    replay (by loss) would never pick it, so counting it as untrained kept the lineage training on
    fitted samples at twice its share while other tenants' new facts waited."""
    config = trainer.config
    fitted = TrainSample(7, [5, 6, 7, 8], 2, created_at=0.0)
    trainer.intake.accept(fitted, held_out=False, loss=2.0)
    fitted.num_trained, fitted.loss = 3, 0.01  # trained and fit
    repeat = TrainSample(8, [5, 6, 7, 8], 2, created_at=1.0)
    trainer.intake.accept(repeat, held_out=False, loss=config.converged_loss / 2)  # scored: already fit
    assert trainer.shared.expected_gain(config) == trainer.shared.drift.ratio  # nothing untrained to gain
    assert trainer.is_converged and not trainer.shared.is_trainable(config)
    unfit = TrainSample(9, [5, 6, 9, 9], 2, created_at=2.0)
    trainer.intake.accept(unfit, held_out=False, loss=config.converged_loss)
    assert trainer.shared.expected_gain(config) == trainer.shared.drift.ratio * 2.0
    assert not trainer.is_converged


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


def _run_evaluation(trainer: Trainer, held_out: GateSlice, losses: dict[LossPurpose, float]) -> list[LossPurpose]:
    """Open an evaluation on something new to judge and answer every pass it asks for, follow-ups too, as
    the trainer's upkeep would; the purposes asked, in order."""
    gate = trainer.gate
    trainer.learner.num_optimizer_steps += 1
    gate.last_publish_s -= trainer.config.min_publish_interval_s
    gate.share.charge_training(1e9)  # the gate's share is its own test
    asked: list[LossPurpose] = []
    requests = gate.open(held_out)
    while requests:
        for request in requests:
            asked.append(request.purpose)
            gate.record(LossResult(request, losses[request.purpose]))
        requests = gate.take_requests()
    assert not gate.is_pending
    return asked


def test_the_anchors_are_asked_only_of_a_candidate_the_slice_would_publish(guarded_trainer: Trainer) -> None:
    trainer = guarded_trainer
    trainer.anchors.samples = _anchors(2)
    held_out = GateSlice([TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)], held_out=True)
    no_better = {LossPurpose.CANDIDATE: 0.5, LossPurpose.SERVING: 0.5}
    assert _run_evaluation(trainer, held_out, no_better) == [LossPurpose.CANDIDATE, LossPurpose.SERVING]
    assert math.isnan(trainer.gate.anchor_loss_rise)
    forgetting = {LossPurpose.CANDIDATE: 0.4, LossPurpose.SERVING: 0.5, LossPurpose.ANCHOR: 1.0,
                  LossPurpose.ANCHOR_BASE: 0.5}
    # The serving version has not changed: its loss on the slice is not asked again.
    assert sorted(_run_evaluation(trainer, held_out, forgetting)) == sorted(
        [LossPurpose.CANDIDATE, *[LossPurpose.ANCHOR] * 2, *[LossPurpose.ANCHOR_BASE] * 2])
    assert trainer.active_version == 0 and math.isclose(trainer.gate.anchor_loss_rise, 0.5)
    # Version 0 does not change: its anchor losses are not asked again.
    keeping = {**forgetting, LossPurpose.ANCHOR: 0.6}
    assert _run_evaluation(trainer, held_out, keeping) == [LossPurpose.CANDIDATE, *[LossPurpose.ANCHOR] * 2]
    assert trainer.active_version == 1


def test_anchors_the_scope_sends_to_version_0_are_not_asked(guarded_trainer: Trainer) -> None:
    trainer = guarded_trainer
    near_question, far_question = ANCHOR_QUESTIONS[0], ANCHOR_QUESTIONS[4]
    assert "Germany" in near_question and "plants" in far_question
    prompts = anchor_prompts(trainer.reader.tokenizer)
    near, far = (TrainSample(FIRST_ANCHOR_ID - index, [*prompts[index], 7, 8], len(prompts[index]), created_at=0.0)
                 for index in (0, 4))
    trainer.anchors.samples = [near, far]
    assert trainer.anchors_in_scope(trainer.shared.scope) == [near, far]  # nothing taught: the adapter answers all
    trainer.shared.scope.teach(prompt_words("What is the capital city of Germany? Answer: Berlin"))
    for question in ("What is the name of my cat?", "Who wrote Hamlet?", "How do plants grow?"):
        trainer.prompt_statistics.observe(prompt_words(question))
    assert trainer.anchors_in_scope(trainer.shared.scope) == [near]
    held_out = GateSlice([TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)], held_out=True)
    better = {LossPurpose.CANDIDATE: 0.4, LossPurpose.SERVING: 0.5, LossPurpose.ANCHOR: 0.6,
              LossPurpose.ANCHOR_BASE: 0.6}
    asked = _run_evaluation(trainer, held_out, better)
    assert sorted(asked) == sorted([LossPurpose.CANDIDATE, LossPurpose.SERVING, LossPurpose.ANCHOR,
                                    LossPurpose.ANCHOR_BASE])
    assert trainer.active_version == 1


def test_the_next_evaluation_waits_for_twice_the_last_ones_seconds_of_training(trainer: Trainer) -> None:
    gate = trainer.gate
    held_out = GateSlice([TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)], held_out=True)
    gate.last_publish_s -= trainer.config.min_publish_interval_s
    trainer.learner.num_optimizer_steps += 1
    requests = gate.open(held_out)
    gate.share.charge_evaluation(3.0)  # its passes took 3 s of the engine's slack
    gate.share.charge_training(1.0)  # training ran beside them: that is not training since it closed
    for request in requests:
        gate.record(LossResult(request, 0.5))  # no better: held back
    trainer.learner.num_optimizer_steps += 1
    needed = 3.0 * (1 / publish_gate.GATE_SHARE - 1)
    gate.share.charge_training(needed - 0.1)
    assert not gate.is_due() and gate.is_due(paced=False)  # a resting trainer loses nothing to the gate
    gate.share.charge_training(0.2)
    assert gate.is_due()


def test_one_lineages_evaluation_makes_every_lineages_gate_wait_for_training(trainer: Trainer) -> None:
    # The share is the machine's: with one account per gate, 16 tenants' gates each judged after every
    # optimizer step of theirs, and together took most of training's time.
    alice = trainer.resident("alice")
    # alice's learner has a step its gate has not judged
    alice.parked = dataclasses.replace(trainer.learner.initial_state, num_optimizer_steps=1)
    alice.gate.last_publish_s -= trainer.config.min_publish_interval_s
    assert alice.gate.is_due()
    shared = trainer.gate
    shared.last_publish_s -= trainer.config.min_publish_interval_s
    trainer.learner.num_optimizer_steps += 1
    held_out = GateSlice([TrainSample(1000, [5, 6, 7, 8], 2, created_at=0.0)], held_out=True)
    requests = shared.open(held_out)
    assert requests
    shared.share.charge_evaluation(3.0)
    for request in requests:
        shared.record(LossResult(request, 0.5))  # no better: held back
    assert not alice.gate.is_due() and alice.gate.is_due(paced=False)
    alice.gate.share.charge_training(3.0 * (1 / publish_gate.GATE_SHARE - 1))
    assert alice.gate.is_due()


def test_a_resting_lineages_last_steps_are_judged_whatever_the_gates_share(trainer: Trainer) -> None:
    # The share grows with training's seconds: once most tenants rest it grows slowly, and a tenant
    # that had learned its facts kept serving the version before its last steps.
    alice = trainer.resident("alice")
    fitted = TrainSample(7, [5, 6, 7, 8], 2, created_at=0.0)
    alice.intake.accept(fitted, held_out=False, loss=2.0)
    alice.parked = dataclasses.replace(trainer.learner.initial_state, num_optimizer_steps=1)
    alice.gate.last_publish_s -= trainer.config.min_publish_interval_s
    trainer.gate.share.charge_evaluation(3.0)  # another gate's passes, just closed: the share is spent
    trainer.gate.share.close()
    assert not alice.gate.is_due()
    assert not alice.is_converged(trainer.config)  # its sample is not fit yet: training goes first
    trainer.upkeep_stages()
    assert not alice.gate.is_pending
    fitted.num_trained, fitted.loss = 1, trainer.config.converged_loss / 2  # it fits: alice rests
    trainer.upkeep_stages()
    assert alice.gate.is_pending


def test_after_a_publish_the_new_versions_losses_are_the_candidates_not_asked_again(trainer: Trainer) -> None:
    gate = trainer.gate
    first, second = (TrainSample(sample_id, [5, 6, 7, 8], 2, created_at=0.0) for sample_id in (1000, 1001))

    def evaluate(samples: list[TrainSample], candidate_loss: float) -> list[LossPurpose]:
        losses = {LossPurpose.CANDIDATE: candidate_loss, LossPurpose.SERVING: 3.0}
        return _run_evaluation(trainer, GateSlice(samples, held_out=True), losses)

    assert evaluate([first], candidate_loss=1.0) == [LossPurpose.CANDIDATE, LossPurpose.SERVING]
    assert trainer.active_version == 1
    # Version 1 is that candidate: its loss on `first` is known; only the new sample is asked of it.
    assert evaluate([first, second], candidate_loss=0.5) == [LossPurpose.CANDIDATE, LossPurpose.CANDIDATE,
                                                             LossPurpose.SERVING]
    assert trainer.active_version == 2 and gate.serving_heldout_loss == 0.5


def test_the_gates_slice_weighs_the_newest_corrections_beside_the_held_out_repeats(trainer: Trainer) -> None:
    # Users taught a new answer (sample 4); the held-out repeats (2, 3) are of answers taught before.
    # A candidate that learned the new answer and lost a little on an older one is published: judged
    # on the held-out repeats alone it would be held back, and the new answer never served.
    intake = trainer.intake
    for sample_id, prompt in ((1, [11, 12]), (2, [11, 12]), (3, [11, 12]), (4, [31, 32])):
        intake.accept(TrainSample(sample_id, [*prompt, 50], 2, created_at=float(sample_id)),
                      held_out=sample_id in (2, 3), loss=3.0)
    gate_slice = intake.gate_slice()
    assert [s.sample_id for s in gate_slice.samples] == [1, 2, 3, 4] and gate_slice.held_out
    learner, serving = {1: 1.2, 2: 1.2, 3: 1.2, 4: 0.2}, {1: 1.0, 2: 1.0, 3: 1.0, 4: 3.0}
    held_out_only = [sample for sample in gate_slice.samples if sample.sample_id in (2, 3)]
    assert trainer.gate.decide(Evaluation(held_out_only, trainer.active_version,
                                          learner_losses=learner, serving_losses=serving)) is None
    assert trainer.gate.decide(Evaluation(gate_slice.samples, trainer.active_version, weights=gate_slice.weights,
                                          learner_losses=learner, serving_losses=serving)) == 1


def test_held_out_questions_no_sample_taught_weigh_less_in_the_gates_slice(trainer: Trainer) -> None:
    # A learner that learned the taught question and lost a little on one nobody taught is published;
    # with every sample weighing alike it would be held back.
    intake = trainer.intake
    taught, untaught = [11, 12, 13], [21, 22, 23]
    intake.accept(TrainSample(1, [*taught, 50], 3, created_at=1.0), held_out=False, loss=3.0)
    intake.accept(TrainSample(2, [*taught, 50], 3, created_at=2.0), held_out=True, loss=3.0)
    intake.accept(TrainSample(3, [*untaught, 60], 3, created_at=3.0), held_out=True, loss=3.0)
    gate_slice = intake.gate_slice()
    assert [s.sample_id for s in gate_slice.samples] == [1, 2, 3]  # the newest training sample too
    assert gate_slice.weights == [1.0, 1.0, trainer.config.heldout_untaught_weight]

    def judged(weights: list[float] | None) -> int | None:
        return trainer.gate.decide(Evaluation(gate_slice.samples, trainer.active_version, weights=weights,
                                              learner_losses={1: 1.0, 2: 1.0, 3: 6.0},
                                              serving_losses={1: 2.0, 2: 2.0, 3: 2.5}))

    assert judged(None) is None and trainer.active_version == 0
    assert judged(gate_slice.weights) == 1 and trainer.active_version == 1
