"""Sampling edge cases on hand-made logits (no model)."""

from __future__ import annotations

import torch

from mace.engine.request import SamplingParams
from mace.engine.sampler import Sampler


def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing() -> None:
    logits = torch.tensor([[30.0, -30.0, 5.0, 29.0]])
    # 30 / 1e-40 overflows float32: sampling would see inf scores and no distribution at all.
    params = SamplingParams(max_tokens=1, temperature=1e-40, seed=0)
    assert params.is_greedy
    assert Sampler().sample(logits, ["r"], [params]) == [0]


def test_a_small_temperature_still_samples() -> None:
    logits = torch.tensor([[1.0, 1.0]])
    params = SamplingParams(max_tokens=1, temperature=1e-3, seed=0)
    assert not params.is_greedy
    tokens = {Sampler().sample(logits, [f"r{i}"], [SamplingParams(max_tokens=1, temperature=1e-3, seed=i)])[0]
              for i in range(32)}
    assert tokens == {0, 1}  # two equal logits: both are drawn


def test_a_vanishing_top_p_keeps_the_best_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    # 2.2e-311 is a float64 subnormal; against float32 scores it rounds to 0, and "covered >= 0" held
    # for the best token too, which left nothing to sample from.
    for top_p in (2.225073858507e-311, 1e-9):
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=0)
        assert Sampler().sample(logits, ["r"], [params]) == [1]
