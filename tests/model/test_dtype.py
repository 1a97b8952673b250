"""dtype `auto` and the bf16 path: resolution by device, serving against fp32, training in fp32 state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mace.engine.plan import IterationPlan, ScheduledChunk
from mace.engine.request import Request, SamplingParams
from mace.engine.runner import ModelRunner
from mace.model import loader
from mace.model.loader import ModelBundle, load_model, resolve_dtype
from mace.train.learner import Learner
from mace.train.replay import TrainSample
from tests.conftest import tiny_config

CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: the tiny model's logits (|logit| ~1) move by about 0.013 in bf16.
BF16_LOGIT_TOLERANCE = 0.05


def test_explicit_dtypes_are_kept() -> None:
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f"}, torch.float32),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"amx_tile", "amx_bf16"}, torch.bfloat16),
    (set(), torch.float32),
])
def test_auto_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                    expected: torch.dtype) -> None:
    monkeypatch.setattr(loader, "cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto", CPU) == expected


def test_auto_is_the_default(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, model={"dtype": "auto"})
    assert config.model.dtype == "auto"
    assert load_model(config.model, config.cache_dir).dtype == resolve_dtype("auto", CPU)


def _bundle(tmp_path: Path, dtype: str) -> ModelBundle:
    config = tiny_config(tmp_path / dtype, model={"dtype": dtype})
    return load_model(config.model, config.cache_dir)


def _runner_logits(bundle: ModelBundle, prompt: list[int]) -> torch.Tensor:
    """The runner's last-position logits for `prompt` ([vocab], float32)."""
    runner = ModelRunner(bundle.causal_lm, 256, CPU)
    request = Request(request_id="r", prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4),
                      eos_token_ids=frozenset(), max_model_len=256, arrival_time_s=0.0)
    with torch.inference_mode():
        inputs = runner._prepare(IterationPlan(chunks=[ScheduledChunk.of(request, len(prompt))]))
        logits = runner._logits(inputs, runner._forward(inputs))
    assert logits is not None
    return logits.values[0]


def test_bf16_serving_stays_near_fp32(tmp_path: Path) -> None:
    prompt = list(range(40, 90))
    full = _runner_logits(_bundle(tmp_path, "float32"), prompt)
    half = _runner_logits(_bundle(tmp_path, "bfloat16"), prompt)
    assert (half - full).abs().max().item() < BF16_LOGIT_TOLERANCE
    assert torch.topk(full, 5).indices.tolist()[:1] == torch.topk(half, 5).indices.tolist()[:1]


def test_bf16_training_keeps_lora_and_optimizer_state_in_fp32(tmp_path: Path) -> None:
    losses = {}
    for dtype in ("float32", "bfloat16"):
        bundle = _bundle(tmp_path, dtype)
        learner = Learner(bundle.causal_lm, tiny_config(tmp_path).train)
        step = learner.micro_step([TrainSample(1, list(range(5, 45)), 12, 0.0)])
        while not step.is_done:
            step.run_next()
        learner.accumulated(learner.config.batch_size)
        assert learner.optimizer_step()
        params = learner._learner_params()
        assert params and all(p.dtype == torch.float32 for p in params)
        states = [learner.optimizer.state[p] for p in params]
        assert all(s["exp_avg"].dtype == torch.float32 for s in states)
        losses[dtype] = step.losses[0]
    assert math.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]


@pytest.mark.slow
async def test_bf16_answers_as_fp32_on_the_default_model(tmp_path: Path) -> None:
    """The guard `auto` must pass where it picks bf16: >= 90% of greedy tokens and perplexity within 2%."""
    from mace.engine.frontend import AsyncEngine
    from mace.model.quality import PROMPTS, greedy_answers, perplexity, token_agreement
    from tests.model.test_smollm2 import shared_cache_dir

    answers, perplexities = {}, {}
    for dtype in ("float32", "bfloat16"):
        # Loose latency targets: on its priors (no warm-up) the scheduler would serve one prompt at a time.
        config = tiny_config(tmp_path / dtype, model={"name": "builtin:smollm2", "dtype": dtype},
                             slo={"ttft_s": 600.0, "tpot_s": 60.0}, cache_dir=str(shared_cache_dir()))
        bundle = load_model(config.model, config.cache_dir)
        answers[dtype] = await greedy_answers(AsyncEngine(bundle, config), max_tokens=16)
        perplexities[dtype] = perplexity(bundle)
    assert len(PROMPTS) >= 50
    assert token_agreement(answers["float32"], answers["bfloat16"]) >= 0.9
    assert abs(perplexities["bfloat16"] / perplexities["float32"] - 1) <= 0.02


def test_low_precision_logits_are_rescored_in_fp32_at_the_top() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2000, 64, generator=generator).bfloat16()  # [vocab, hidden]
    last = torch.randn(4, 64, generator=generator).bfloat16()  # [S, hidden]
    exact = last.float() @ weight.float().T  # what an fp32 output of the same weights gives
    rounded = torch.nn.functional.linear(last, weight).float()
    rescored = ModelRunner._rescore_top(rounded.clone(), last, weight)
    top = exact.argmax(dim=-1, keepdim=True)
    assert torch.equal(rescored.argmax(dim=-1, keepdim=True), top)
    assert torch.allclose(rescored.gather(1, top), exact.gather(1, top), atol=1e-4)
    assert not torch.allclose(rounded.gather(1, top), exact.gather(1, top), atol=1e-4)  # bf16 alone is off
