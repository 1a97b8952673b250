"""The learner's fast adapter switches give the same outputs as peft's own routing."""

from __future__ import annotations

from pathlib import Path

import torch

from mace.model.loader import ModelBundle
from mace.train.learner import BASE, Learner, adapter_name
from tests.conftest import tiny_config


def test_uniform_switches_equal_peft_routing(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path).train)
    try:
        torch.manual_seed(0)
        for param in learner._learner_params():
            torch.nn.init.normal_(param, std=0.05)
        learner.publish(1)
        for param in learner._learner_params():  # the learner moves on: v1 and the learner now differ
            torch.nn.init.normal_(param, std=0.05)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        model = learner.peft_model

        def logits() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids).logits  # type: ignore[no-any-return]

        learner_out = logits()
        with model.disable_adapter():
            base_reference = logits()
        with model.base_model._enable_peft_forward_hooks(adapter_names=[adapter_name(1)]):
            v1_reference = logits()
        with learner.serving([BASE] * 6):
            base_out = logits()
        with learner.serving([adapter_name(1)] * 6):
            v1_out = logits()
        torch.testing.assert_close(base_out, base_reference)
        torch.testing.assert_close(v1_out, v1_reference)
        assert not torch.allclose(base_out, v1_out) and not torch.allclose(v1_out, learner_out)
        torch.testing.assert_close(logits(), learner_out)  # the learner is active again afterwards
    finally:
        learner.peft_model.unload()
