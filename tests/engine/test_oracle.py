"""The correctness oracle: greedy tokens of concurrent, staggered requests equal `generate()` alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mace.engine.frontend import AsyncEngine
from mace.engine.request import SamplingParams
from mace.model.loader import ModelBundle, load_model
from tests.conftest import tiny_config

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write a haiku about the sea, the wind and the salt on a fisherman's hands.",
    "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 6,
    "Tell me a story about a dragon and a knight.",
    "1 2 3 4 5 6 7 8",
]


def reference(bundle: ModelBundle, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = bundle.causal_lm
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=bundle.tokenizer.pad_token_id,
        )
    return list(out[0, len(prompt_ids) :].tolist())


def chat_ids(bundle: ModelBundle, text: str) -> list[int]:
    rendered = bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(bundle.tokenizer.encode(rendered, add_special_tokens=False))


async def run_staggered(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async def one(index: int, ids: list[int]) -> list[int]:
        await asyncio.sleep(0.03 * index)  # arrive while earlier requests are mid-generation
        tokens: list[int] = []
        async for delta in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0)):
            tokens.extend(delta.new_token_ids)
        return tokens

    engine.start()
    try:
        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["standard", "transposed"])  # each GEMM layout of decode-sized batches
@pytest.mark.parametrize("batched_tokens", [256, 24])  # 24 forces chunked prefill of the longer prompts
async def test_greedy_equals_generate_on_tiny(tmp_path: Path, batched_tokens: int, layout: str) -> None:
    config = tiny_config(tmp_path, engine={"max_num_batched_tokens": batched_tokens},
                         model={"linear_layout": layout})
    bundle = load_model(config.model, config.cache_dir)
    engine = AsyncEngine(bundle, config)
    prompts = [chat_ids(bundle, text) for text in PROMPTS]
    got = await run_staggered(engine, prompts, max_tokens=24)
    for ids, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(bundle, ids, 24)[: len(tokens)]
        assert len(tokens) == 24 or tokens[-1] in bundle.eos_token_ids


@pytest.mark.slow
async def test_greedy_equals_generate_on_default_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.model.test_smollm2 import shared_cache_dir

    config = tiny_config(
        tmp_path_factory.mktemp("smol"),
        # The layout `auto` picks where it measures faster: the one that is not nn.Linear's own.
        model={"name": "builtin:smollm2", "max_model_len": 2048, "linear_layout": "transposed"},
        cache_dir=str(shared_cache_dir()),
    )
    bundle = load_model(config.model, config.cache_dir)
    engine = AsyncEngine(bundle, config)
    prompts = [chat_ids(bundle, text) for text in PROMPTS[:4]]
    got = await run_staggered(engine, prompts, max_tokens=16)
    for ids, tokens in zip(prompts, got, strict=True):
        expected = reference(bundle, ids, 16)
        assert tokens == expected[: len(tokens)]
        assert len(tokens) == len(expected)
