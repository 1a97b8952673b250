"""Prefix sharing end to end on builtin:tiny: same greedy tokens as without it, reported and counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from mace.engine.core import EngineCore
from mace.engine.frontend import AsyncEngine
from mace.engine.inbox import AddRequest
from mace.engine.prefix_cache import root_key
from mace.engine.request import Request, RequestOutput, SamplingParams
from mace.model.loader import ModelBundle
from tests.conftest import RunningServer, tiny_config, wait_until
from tests.engine.test_memory import consume
from tests.engine.test_oracle import reference

SYSTEM = "You are a terse assistant who answers in one line. " * 4  # ~200 byte tokens, 12 blocks
QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hi.", "What is the capital of Spain?", "Count to three."]


def prompt_ids(bundle: ModelBundle, question: str) -> list[int]:
    return list(bundle.tokenizer.encode(SYSTEM + question, add_special_tokens=False))


async def collect(engine: AsyncEngine, ids: list[int], max_tokens: int, delay_s: float = 0.0) -> list[RequestOutput]:
    await asyncio.sleep(delay_s)  # staggered: later requests arrive while earlier ones decode
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [delta async for delta in engine.generate(ids, params)]


async def run_all(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> list[list[RequestOutput]]:
    engine.start()
    try:
        first = [await collect(engine, prompts[0], max_tokens)]  # computes and caches the shared prefix
        rest = await asyncio.gather(*(collect(engine, ids, max_tokens, 0.02 * i) for i, ids in enumerate(prompts)))
        return first + list(rest)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("batched_tokens", [256, 24])  # 24: the suffix after a hit is chunked too
async def test_greedy_outputs_equal_with_sharing_on_and_off(
    tmp_path: Path, tiny_bundle: ModelBundle, batched_tokens: int
) -> None:
    prompts = [prompt_ids(tiny_bundle, q) for q in QUESTIONS]
    outputs = {}
    for sharing in (True, False):
        config = tiny_config(tmp_path, engine={"max_num_batched_tokens": batched_tokens},
                             memory={"prefix_caching": sharing})
        engine = AsyncEngine(tiny_bundle, config)
        results = await run_all(engine, prompts, max_tokens=12)
        outputs[sharing] = [[t for d in deltas for t in d.new_token_ids] for deltas in results]
        cached = [deltas[-1].num_cached_tokens for deltas in results]
        if sharing:
            assert all(n >= len(tiny_bundle.tokenizer.encode(SYSTEM)) // 16 * 16 for n in cached[1:]), cached
            assert engine.load.prefix_cache_hits == sum(cached) > 0
        else:
            assert cached == [0] * len(results)
    assert outputs[True] == outputs[False]
    assert outputs[True][0] == reference(tiny_bundle, prompts[0], 12)
    assert outputs[True][1] == reference(tiny_bundle, prompts[0], 12)  # the first prompt again, from the cache


async def test_kv_of_another_adapter_version_is_never_reused(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    ids = prompt_ids(tiny_bundle, QUESTIONS[0])
    engine.start()
    try:
        await collect(engine, ids, 2)
        again = await collect(engine, ids, 2)
        # What a publish does: new requests pin version 1.
        engine.core._pin = lambda message: setattr(message.request, "adapter_version", 1)  # type: ignore[method-assign]
        other = await collect(engine, ids, 2)
    finally:
        engine.shutdown()
    assert again[-1].num_cached_tokens > 0
    assert other[-1].num_cached_tokens == 0


def test_tenants_share_the_base_models_kv_and_nothing_else() -> None:
    def key(version: int, tenant: str) -> bytes:
        return root_key(Request("r", [1], SamplingParams(), frozenset(), 16, 0.0, adapter_version=version,
                                tenant=tenant))

    assert key(0, "alice") == key(0, "bob") == key(0, "")
    assert len({key(1, "alice"), key(1, "bob"), key(1, "")}) == 3


async def test_cached_tokens_in_usage_and_metrics(server: RunningServer, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there."}]
    chat = {"model": "builtin:tiny", "messages": messages, "max_tokens": 3, "temperature": 0}
    completion = {"model": "builtin:tiny", "prompt": SYSTEM + "Once upon", "max_tokens": 3, "temperature": 0}
    for path, body in (("chat/completions", chat), ("completions", completion)):
        async with http.post(f"{server.url}/v1/{path}", json=body) as response:
            # At most a template's opening tokens, sent by earlier tests to the same server: not the system prompt.
            assert (await response.json())["usage"]["prompt_tokens_details"]["cached_tokens"] < 16
        async with http.post(f"{server.url}/v1/{path}", json=body) as response:
            usage = (await response.json())["usage"]
        # The same prompt again: all of it but the last token, which runs for the logits.
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(f"{server.url}/v1/{path}", json=stream) as response:
            events = [json.loads(line[6:]) async for line in response.content if line.startswith(b"data: {")]
        assert events[-1]["choices"] == []
        assert events[-1]["usage"]["prompt_tokens_details"] == usage["prompt_tokens_details"]
    await wait_until(server.idle, what="requests done")
    async with http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mace:")}
    assert values["mace:prefix_cache_hits_total"] >= 4 * 192
    assert values["mace:prefix_cache_queries_total"] > values["mace:prefix_cache_hits_total"]
    assert values["mace:kv_cache_blocks_cached"] > 0 and values["mace:kv_cache_cached_bytes"] > 0
    assert values["mace:kv_cache_blocks_used"] == 0
    assert values["mace:kv_cache_blocks_total"] > 0 and values["mace:memory_budget_bytes"] == 268435456


def common_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def tokens_of(deltas: list[RequestOutput]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


async def test_a_prefix_ending_mid_block_is_reused_to_the_token(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    first, second = (prompt_ids(tiny_bundle, q) for q in ("What is 2+2?", "What is the capital of Spain?"))
    common = common_length(first, second)
    assert common % 16  # the shared prefix ends inside a block
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    engine.start()
    try:
        results = [await collect(engine, ids, 8) for ids in (first, second, first)]
    finally:
        engine.shutdown()
    # The first prompt again: all of it is cached, but its last token runs to give the logits.
    assert [deltas[-1].num_cached_tokens for deltas in results] == [0, common, len(first) - 1]
    assert engine.load.prefix_cache_hits == common + len(first) - 1
    for ids, deltas in zip((first, second, first), results, strict=True):
        assert tokens_of(deltas) == reference(tiny_bundle, ids, 8)


async def test_requests_sharing_a_partial_block_then_diverging_both_stay_exact(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    prefix = prompt_ids(tiny_bundle, "Q: what")
    assert len(prefix) % 16
    tails = ["s red?", "'s blue?", " cat?"]  # no two share a first token
    prompts = [prefix + list(tiny_bundle.tokenizer.encode(tail, add_special_tokens=False)) for tail in tails]
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    engine.start()
    try:
        await collect(engine, prefix, 1)  # caches the prefix, its last block partial
        # Admitted in one step, both start from the partial block, then each writes its own tail after it.
        both = await asyncio.gather(*(collect(engine, ids, 16) for ids in prompts[:2]))
        third = await collect(engine, prompts[2], 16)  # the block they shared is still what it was
        again = await collect(engine, prefix, 4)
    finally:
        engine.shutdown()
    assert [deltas[-1].num_cached_tokens for deltas in [*both, third]] == [len(prefix)] * 3
    assert again[-1].num_cached_tokens == len(prefix) - 1
    for ids, deltas in zip(prompts, [*both, third], strict=True):
        assert tokens_of(deltas) == reference(tiny_bundle, ids, 16)
    assert tokens_of(again) == reference(tiny_bundle, prefix, 4)


async def test_preemptions_and_aborts_mid_prefill_leave_no_block_behind(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    config = tiny_config(tmp_path, engine={"max_num_batched_tokens": 24}, memory={"budget_bytes": 2 * 1024**2})
    engine = AsyncEngine(tiny_bundle, config)  # 20 blocks of 16 tokens: four of these requests do not fit at once
    prefix = prompt_ids(tiny_bundle, "Shared:")[-37:]  # two blocks and five tokens
    kept = [prefix + [40 + i] * 20 for i in range(4)]
    aborted = [prefix + [60 + i] * 120 for i in range(2)]  # five steps of prefill at 24 tokens a step

    async def abort_mid_prefill(ids: list[int], request_id: str) -> None:
        params = SamplingParams(max_tokens=8, temperature=0)
        task = asyncio.ensure_future(consume(engine.generate(ids, params, request_id=request_id), 1, []))

        async def prefilling() -> bool:  # past its cached prefix, not yet at its first token
            return any(r.request_id == request_id and len(prefix) < r.num_computed_tokens < len(ids)
                       for r in list(engine.core.scheduler.running))

        await wait_until(prefilling, what=f"{request_id} mid-prefill")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    engine.start()
    try:
        await collect(engine, prefix, 1)
        outputs = await asyncio.gather(*(collect(engine, ids, 40) for ids in kept),
                                       *(abort_mid_prefill(ids, f"aborted-{i}") for i, ids in enumerate(aborted)))

        async def idle() -> bool:
            return not engine.core.scheduler.has_work and engine.core.runner.kv.num_used_slots == 0

        await wait_until(idle, what="engine idle")
    finally:
        engine.shutdown()
    assert engine.core.scheduler.num_preemptions > 0
    for ids, deltas in zip(kept, outputs[: len(kept)], strict=True):
        assert tokens_of(deltas) == reference(tiny_bundle, ids, 40)
    cache = engine.core.memory.prefix_cache
    assert cache is not None and engine.core.blocks.num_used_blocks == 0
    engine.core.blocks.check()
    cache.check()
    assert len(engine.core.runner.block_store) == cache.num_cached_blocks
    cache.clear()
    engine.core.runner.block_store.drop(tuple(b for c in cache.take_copies() for b in c.block_ids))
    blocks = engine.core.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and len(engine.core.runner.block_store) == 0


@pytest.mark.slow
async def test_greedy_with_a_shared_system_prompt_equals_generate_on_default_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from mace.model.loader import load_model
    from tests.model.test_smollm2 import shared_cache_dir

    config = tiny_config(tmp_path_factory.mktemp("smol"), model={"name": "builtin:smollm2", "max_model_len": 2048},
                         cache_dir=str(shared_cache_dir()))
    bundle = load_model(config.model, config.cache_dir)
    prompts = [list(bundle.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        add_generation_prompt=True, tokenize=False,
    )) for q in QUESTIONS[:3]]
    ids = [list(bundle.tokenizer.encode(text, add_special_tokens=False)) for text in map("".join, prompts)]
    results = await run_all(AsyncEngine(bundle, config), ids, max_tokens=8)
    assert all(deltas[-1].num_cached_tokens >= 48 for deltas in results[1:])
    for prompt, deltas in zip([ids[0], *ids], results, strict=True):
        expected = reference(bundle, prompt, 8)  # stops at EOS, where the engine (ignore_eos) goes on
        assert [t for d in deltas for t in d.new_token_ids][: len(expected)] == expected


def test_a_request_id_reused_right_after_it_finished_gets_its_own_kv(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    # A finished request's KV row is released by the next plan, the same plan that loads the cached
    # prefix for a new request under the same id: the load must land in the new request's row, not in
    # the old one that the release then hands to another request. The core is stepped by hand so the
    # new request is always in that plan, and a longer request keeps running beside it.
    core = EngineCore(tiny_bundle, tiny_config(tmp_path))
    ids = prompt_ids(tiny_bundle, QUESTIONS[0])

    def add(request_id: str, prompt: list[int], max_tokens: int) -> None:
        core.handle(AddRequest(Request(
            request_id=request_id, prompt_token_ids=prompt, eos_token_ids=tiny_bundle.eos_token_ids,
            sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            max_model_len=1024, arrival_time_s=0.0)))

    answers = []
    for turn in range(2):
        add("same-id", ids, 8)
        if turn == 0:
            add("longer", prompt_ids(tiny_bundle, QUESTIONS[1]), 40)
        deltas: list[RequestOutput] = []
        while not (deltas and deltas[-1].finished):
            deltas += [d for d in core.step() if d.request_id == "same-id"]
        answers.append((tokens_of(deltas), deltas[-1].num_cached_tokens))
    assert core.scheduler.running  # the longer request ran beside both
    assert answers[1][1] > 0  # the repeat read the cached prefix
    assert answers[1][0] == answers[0][0] == reference(tiny_bundle, ids, 8)
