"""A data dir trained with one LoRA shape is refused, saying both shapes, by a server configured for another."""

from __future__ import annotations

from pathlib import Path

import pytest

from mace.model.loader import ModelBundle
from mace.train.learner import AdapterShapeMismatch, Learner, lora_layers
from tests.conftest import tiny_config


def test_lora_layers_are_the_top_share_and_at_least_one() -> None:
    assert lora_layers(30, 0.33) == list(range(20, 30))
    assert lora_layers(6, 1.0) == list(range(6))
    assert lora_layers(6, 0.01) == [5]


def test_a_learner_state_of_another_shape_is_refused_naming_both(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    old = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path, train={
        "target_modules": ["down_proj"], "lora_rank": 4, "lora_layer_fraction": 0.5}).train)
    try:
        stored = old.capture()
    finally:
        old.peft_model.unload()
    new = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path).train)  # the shipped shape: q, v of every layer
    try:
        num_layers = len(tiny_bundle.causal_lm.model.layers)
        top = lora_layers(num_layers, 0.5)
        with pytest.raises(AdapterShapeMismatch) as raised:
            new.unpark(stored)
        message = str(raised.value)
        assert f"rank 4 on down_proj of layers {top[0]}-{top[-1]}" in message
        assert f"rank {new.config.lora_rank} on q_proj, v_proj of layers 0-{num_layers - 1}" in message
        new.unpark(new.capture())  # its own shape still loads
    finally:
        new.peft_model.unload()
