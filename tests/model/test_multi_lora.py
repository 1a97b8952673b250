"""The multi-LoRA forward: each row of a mixed batch equals that row alone on its own adapter, and
equals peft's mixed-adapter forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mace.model import tiny
from mace.model.loader import ModelBundle
from mace.model.multi_lora import MultiLora
from mace.train.learner import BASE, Learner
from tests.conftest import tiny_config

NUM_VERSIONS = 8
# Rows' versions: 8 distinct adapters, then base rows mixed in, then one adapter on two rows.
ROW_VERSIONS = [[1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 0, 8, 1, 0, 5, 2], [4, 0, 4, 0, 4, 0, 4, 0]]


def publish_random_versions(learner: Learner, num_versions: int) -> None:
    """Versions 1..num_versions, each with its own random weights, strong enough to change tokens."""
    generator = torch.Generator().manual_seed(7)
    for version in range(1, num_versions + 1):
        with torch.no_grad():
            for param in learner._learner_params():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        learner.publish(version)


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def learner(request: pytest.FixtureRequest, tmp_path: Path, tiny_bundle: ModelBundle) -> Iterator[Learner]:
    # Few slots on purpose: publishing 8 versions grows them, and the stacks are rebuilt on the way.
    config = tiny_config(tmp_path, train={"max_versions_loaded": 2}).train
    model = tiny.build_model(len(tiny_bundle.tokenizer), seed=3, dtype=request.param).eval()
    learner = Learner(model, config)
    publish_random_versions(learner, NUM_VERSIONS)
    yield learner
    learner.peft_model.unload()


def tolerance(learner: Learner) -> dict[str, float]:
    """bf16: a base matmul's rounding may differ between batch shapes; fp32: assert_close's defaults."""
    is_bf16 = learner.peft_model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    return {"atol": 0.05, "rtol": 0.02} if is_bf16 else {}


def logits(learner: Learner, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    with torch.inference_mode(), learner.serving(names):
        return learner.peft_model(input_ids=ids).logits.float()  # type: ignore[no-any-return]


@pytest.mark.parametrize("versions", ROW_VERSIONS)
def test_mixed_rows_equal_each_row_alone(learner: Learner, versions: list[int]) -> None:
    ids = torch.randint(0, 250, (len(versions), 12), generator=torch.Generator().manual_seed(1))
    names = [learner.adapter_for(version) for version in versions]
    mixed = logits(learner, ids, names)
    alone = torch.cat([logits(learner, ids[i : i + 1], [name]) for i, name in enumerate(names)])
    torch.testing.assert_close(mixed, alone, **tolerance(learner))
    base = logits(learner, ids, [BASE] * len(versions))
    for row, version in enumerate(versions):  # the adapters do change the output, row by row
        assert torch.allclose(mixed[row], base[row]) == (version == 0)


def test_mixed_rows_equal_peft_mixed_forward(learner: Learner) -> None:
    ids = torch.randint(0, 250, (8, 12), generator=torch.Generator().manual_seed(2))
    names = [learner.adapter_for(version) for version in ROW_VERSIONS[1]]
    with torch.inference_mode(), learner.peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
        reference = learner.peft_model(input_ids=ids).logits.float()
    # bf16: peft rounds each adapter's output to bf16 before adding it; ours adds in fp32 and rounds once.
    torch.testing.assert_close(logits(learner, ids, names), reference, **tolerance(learner))


def test_a_publish_reaches_the_stacks(learner: Learner) -> None:
    ids = torch.randint(0, 250, (2, 6), generator=torch.Generator().manual_seed(3))
    names = [BASE, learner.adapter_for(1)]
    before = logits(learner, ids, names)
    with torch.no_grad():
        for param in learner._learner_params():
            param.add_(0.05)
    learner.publish(1)  # a weight copy into version 1's slot: the slot's parameters are views of the stacks
    after = logits(learner, ids, names)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    alone = torch.cat([logits(learner, ids[i : i + 1], [name]) for i, name in enumerate(names)])
    torch.testing.assert_close(after, alone, **tolerance(learner))


def test_base_rows_only_add_nothing(learner: Learner) -> None:
    multi: MultiLora = learner._multi
    routing = multi.routing([None, None])
    assert routing.adapters.numel() == 0 and routing.mask.shape == (2, 0, 1)
