"""Layer-staged micro-steps compute the same LoRA gradients as one whole-model backward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mace.model.loader import ModelBundle
from mace.train.layered import HEAD_STAGE_TOKENS, padded_tokens, passes
from mace.train.learner import BASE, CANDIDATE, LEARNER, Learner
from mace.train.replay import TrainSample
from mace.train.work import StageKind
from tests.conftest import tiny_config


def _learner(tmp_path: Path, bundle: ModelBundle, layer_fraction: float = 1.0) -> Learner:
    config = tiny_config(tmp_path, train={"batch_size": 4, "lora_layer_fraction": layer_fraction,
                                          "target_modules": ["q_proj", "v_proj", "down_proj"]})
    learner = Learner(bundle.causal_lm, config.train)
    torch.manual_seed(0)
    for param in learner._learner_params():  # LoRA B starts at zero; make every gradient non-trivial
        torch.nn.init.normal_(param, std=0.02)
    return learner


@pytest.mark.parametrize("layer_fraction", [1.0, 0.5])
def test_staged_gradients_equal_whole_model_backward(tmp_path: Path, tiny_bundle: ModelBundle,
                                                     layer_fraction: float) -> None:
    """With LoRA on the upper layers only, the backward stops below them and the gradients still match."""
    learner = _learner(tmp_path, tiny_bundle, layer_fraction)
    try:
        samples = [TrainSample(1, list(range(5, 45)), 12, 0.0), TrainSample(2, list(range(50, 70)), 5, 0.0, weight=2.0)]
        params = learner._learner_params()
        reference_losses = []
        for sample in samples:
            ids = torch.tensor([sample.token_ids])
            labels = ids.clone()
            labels[:, : sample.num_prompt_tokens] = -100
            loss = learner.peft_model(input_ids=ids, labels=labels).loss
            reference_losses.append(float(loss.detach()))
            (loss * sample.weight / 4).backward()
        reference = [p.grad.clone() for p in params if p.grad is not None]
        learner.discard_gradients()

        step = learner.micro_step(samples)
        num_layers = len(step.layers)
        trained = round(num_layers * layer_fraction)
        assert step.first_trained == num_layers - trained
        kinds = [stage.kind for stage in step.remaining]
        # Both samples in one pass, the shorter right-padded to the longer; the head on their 43 answer
        # positions in parts, each small enough for a busy step's slack.
        head = [stage.num_tokens for stage in step.remaining if stage.kind == StageKind.HEAD]
        assert head == [HEAD_STAGE_TOKENS] * 5 + [43 - 5 * HEAD_STAGE_TOKENS]
        assert kinds == [StageKind.FORWARD] * num_layers + [StageKind.HEAD] * 6 + [StageKind.BACKWARD] * trained
        assert step.remaining[0].num_tokens == 2 * 40
        while not step.is_done:
            step.run_next()
        staged = [p.grad for p in params if p.grad is not None]
        assert len(staged) == len(reference) == len(params)
        for got, want in zip(staged, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for got_loss, want_loss in zip(step.losses, reference_losses, strict=True):
            assert math.isclose(got_loss, want_loss, rel_tol=1e-5)
    finally:
        learner.peft_model.unload()  # give the shared tiny model back without LoRA layers


def test_identical_samples_share_a_row_and_count_once_per_copy(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = _learner(tmp_path, tiny_bundle)
    try:
        taught = list(range(5, 35))
        samples = [TrainSample(1, taught, 12, 0.0), TrainSample(2, list(range(40, 60)), 5, 0.0),
                   TrainSample(3, list(taught), 12, 0.0, weight=0.5)]  # the first, sent again
        params = learner._learner_params()
        for sample in samples:
            ids = torch.tensor([sample.token_ids])
            labels = ids.clone()
            labels[:, : sample.num_prompt_tokens] = -100
            (learner.peft_model(input_ids=ids, labels=labels).loss * sample.weight / 4).backward()
        reference = [p.grad.clone() for p in params]
        learner.discard_gradients()

        step = learner.micro_step(samples)
        assert step.remaining[0].num_tokens == 2 * 30  # two rows, not three
        while not step.is_done:
            step.run_next()
        for got, want in zip((p.grad for p in params), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert step.losses[0] == step.losses[2] and step.losses[0] != step.losses[1]
    finally:
        learner.peft_model.unload()


def test_non_finite_loss_skips_the_optimizer_step(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = _learner(tmp_path, tiny_bundle)
    try:
        step = learner.micro_step([TrainSample(1, list(range(5, 25)), 10, 0.0)])
        lm_head = learner.peft_model.base_model.model.lm_head.weight
        original = float(lm_head[0, 0])
        with torch.no_grad():
            lm_head[0, 0] = math.inf  # poisons the logits, so the loss
        try:
            while not step.is_done:
                step.run_next()
        finally:
            with torch.no_grad():
                lm_head[0, 0] = original
        assert not math.isfinite(step.losses[0])
        before = [p.detach().clone() for p in learner._learner_params()]
        learner.accumulated(1)
        assert learner.optimizer_step() is False and learner.num_skipped_steps == 1
        for param, old in zip(learner._learner_params(), before, strict=True):
            assert torch.equal(param, old) and param.grad is None
    finally:
        learner.peft_model.unload()


def test_staged_losses_equal_the_whole_model_losses_under_each_adapter(tmp_path: Path,
                                                                     tiny_bundle: ModelBundle) -> None:
    """Samples of different lengths in one pass each get the loss they get alone."""
    learner = _learner(tmp_path, tiny_bundle)
    try:
        samples = [TrainSample(1, list(range(5, 45)), 12, 0.0), TrainSample(2, list(range(60, 77)), 9, 0.0),
                   TrainSample(3, list(range(80, 110)), 20, 0.0)]

        def whole_model_losses() -> list[float]:
            losses = []
            for sample in samples:
                ids = torch.tensor([sample.token_ids])
                labels = ids.clone()
                labels[:, : sample.num_prompt_tokens] = -100
                with torch.no_grad():
                    losses.append(float(learner.peft_model(input_ids=ids, labels=labels).loss))
            return losses

        learner_losses = whole_model_losses()
        with learner.peft_model.disable_adapter():
            base_losses = whole_model_losses()
        assert not math.isclose(learner_losses[0], base_losses[0], rel_tol=1e-4)
        for adapter, want in ((LEARNER, learner_losses), (BASE, base_losses)):
            loss_pass = learner.loss_pass(samples, adapter)
            assert all(stage.is_upkeep for stage in loss_pass.remaining)
            assert loss_pass.remaining[0].num_tokens == 3 * 40
            while not loss_pass.is_done:
                assert all(math.isnan(loss) for loss in loss_pass.losses)
                loss_pass.run_next()
                between = whole_model_losses()  # between stages the learner is active
                assert all(math.isclose(a, b) for a, b in zip(between, learner_losses, strict=True))
            for got, expected in zip(loss_pass.losses, want, strict=True):
                assert math.isclose(got, expected, rel_tol=1e-5)
    finally:
        learner.peft_model.unload()


def test_passes_hold_samples_in_order_within_their_padded_size() -> None:
    def sample(sample_id: int, num_tokens: int) -> TrainSample:
        return TrainSample(sample_id, [7] * num_tokens, 1, 0.0)

    groups = passes([sample(1, 40), sample(2, 60), sample(3, 50), sample(4, 30), sample(5, 200), sample(6, 20)],
                    max_tokens=200)
    assert [[s.sample_id for s in group] for group in groups] == [[1, 2, 3], [4], [5], [6]]
    assert all(padded_tokens(group) <= 200 for group in groups)
    assert [[s.sample_id for s in g] for g in passes([sample(1, 300), sample(2, 10)], max_tokens=200)] == [[1], [2]]


def test_publishing_the_candidate_publishes_the_snapshot_not_later_training(
        tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = _learner(tmp_path, tiny_bundle)
    try:
        learner.snapshot_candidate()
        snapshot = [p.detach().clone() for p in learner._learner_params()]
        for param in learner._learner_params():  # training goes on while the gate evaluates
            torch.nn.init.normal_(param, std=0.02)
        learner.publish(1, CANDIDATE)
        slot = learner.adapter_for(1)
        published = {n: p for n, p in learner.peft_model.named_parameters() if f".{slot}." in n}
        assert len(published) == len(snapshot)
        for value, old in zip(published.values(), snapshot, strict=True):
            assert torch.equal(value, old)
        assert all(p.requires_grad for p in learner._learner_params())
        assert not any(p.requires_grad for p in published.values())
    finally:
        learner.peft_model.unload()
