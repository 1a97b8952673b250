"""The one memory budget under pressure: best-fit admission, who is preempted, what shrinks first,
and that aborted streams give every block back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mace.config import EngineConfig
from mace.engine.frontend import AsyncEngine
from mace.engine.kv_blocks import BlockPool
from mace.engine.memory import MemoryPlan, TrainingReservation
from mace.engine.prefix_cache import PrefixCache
from mace.engine.request import Request, RequestOutput, SamplingParams
from mace.engine.scheduler import MAX_ADMISSION_SKIPS, Scheduler
from mace.model.loader import ModelBundle
from tests.conftest import tiny_config, wait_until
from tests.engine.test_oracle import reference
from tests.engine.test_scheduler import make_request, step

ONE_MIB = 1024**2  # 10 blocks of 16 tokens on builtin:tiny (6 KiB of KV per token)


def prioritised(request_id: str, num_prompt: int, priority: int, max_tokens: int = 8) -> Request:
    request = make_request(request_id, num_prompt, max_tokens)
    request.priority = priority
    return request


def test_best_fit_admits_past_a_request_that_does_not_fit() -> None:
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=256, max_num_seqs=8), BlockPool(8, 4), clock=lambda: 0)
    scheduler.add_request(make_request("running", 16, max_tokens=50))
    step(scheduler)  # holds 5 of 8 blocks
    for request in (make_request("big", 16), make_request("small", 4), make_request("medium", 12)):
        scheduler.add_request(request)
    plan = step(scheduler)
    # 3 blocks free: "big" (4) does not fit; "medium" (3), the largest that fits, goes before "small" (1).
    assert [c.request.request_id for c in plan.chunks] == ["running", "medium"]
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]


def test_a_request_passed_too_often_blocks_the_others_until_it_fits() -> None:
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=256, max_num_seqs=8), BlockPool(20, 4), clock=lambda: 0)
    scheduler.add_request(make_request("running", 40, max_tokens=200))
    step(scheduler)  # 10 of 20 blocks, growing one token a step
    big = make_request("big", 44, max_tokens=2)  # 11 blocks
    scheduler.add_request(big)
    for _ in range(MAX_ADMISSION_SKIPS):
        step(scheduler)
    scheduler.add_request(make_request("small", 2))  # 1 block would fit, but `big` has waited long enough
    step(scheduler)
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]
    scheduler.abort_request("running")
    assert step(scheduler).chunks[0].request is big


def test_memory_pressure_preempts_the_least_important_request() -> None:
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=256, max_num_seqs=8), BlockPool(6, 4), clock=lambda: 0)
    for request in (prioritised("batch", 8, priority=5), prioritised("a", 4, 0), prioritised("b", 4, 1)):
        scheduler.add_request(request)
    step(scheduler)  # 2 + 1 + 1 blocks; "batch" was admitted first
    assert [r.request_id for r in scheduler.running] == ["a", "b", "batch"]
    plans = [step(scheduler) for _ in range(6)]
    preempted = [rid for plan in plans for rid in plan.preempted_request_ids]
    assert preempted and set(preempted) == {"batch"}


def test_training_shrinks_before_any_request_is_preempted() -> None:
    pool = BlockPool(8, 4, block_bytes=100)
    plan = MemoryPlan(800, 0, 0, training_bytes=300, training_bytes_per_token=10, kv_block_bytes=100)
    training = TrainingReservation(pool, plan)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=256, max_num_seqs=8), pool, clock=lambda: 0,
                          train_memory=training)
    assert training.num_blocks == 3
    for name in ("a", "b"):
        scheduler.add_request(make_request(name, 8, max_tokens=12))
    step(scheduler)  # 4 blocks for requests, 3 for training, 1 free
    history = []  # training blocks after each step, and whether it preempted
    for _ in range(10):
        preempted = step(scheduler).preempted_request_ids
        history.append((training.num_blocks, preempted))
    first = next(i for i, (_, preempted) in enumerate(history) if preempted)
    assert history[0][0] == 2 and history[first][0] == 0  # requests grew into training's blocks first
    assert history[first][1] == ["b"]
    assert training.max_tokens() == training.num_blocks * 10 > 0  # growing back once "a" is done


async def test_request_larger_than_free_memory_waits_then_is_served(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path, memory={"budget_bytes": ONE_MIB}))
    assert engine.core.blocks.num_blocks == 10
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    big_ids = [random.Random(1).randrange(256) for _ in range(150)]
    done: list[str] = []

    async def small(index: int) -> None:
        async for _ in engine.generate([10 + index] * 40, params):
            pass
        done.append(f"small-{index}")

    async def big() -> list[int]:  # arrives after the small ones: they hold six blocks
        tokens: list[int] = []
        async for delta in engine.generate(big_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
            if not tokens:
                assert sorted(done) == ["small-0", "small-1"]  # it needs all ten blocks
            tokens.extend(delta.new_token_ids)
        return tokens

    engine.start()
    try:
        results = await asyncio.gather(small(0), small(1), big())
    finally:
        engine.shutdown()
    assert results[2] == reference(tiny_bundle, big_ids, 8)
    assert engine.core.scheduler.num_preemptions == 0


async def test_preempted_request_recomputes_to_the_same_tokens(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path, memory={"budget_bytes": ONE_MIB}))
    victims: list[str] = []
    preempt = engine.core.scheduler._preempt

    def record(request: Request) -> None:
        victims.append(request.request_id)
        preempt(request)

    engine.core.scheduler._preempt = record  # type: ignore[method-assign]
    prompts = {"low": [5] * 30, "high-0": [6] * 30, "high-1": [7] * 30}

    async def run(name: str) -> list[int]:
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        priority = 5 if name == "low" else 0
        deltas = [d async for d in engine.generate(prompts[name], params, request_id=name, priority=priority)]
        return [t for d in deltas for t in d.new_token_ids]

    engine.start()
    try:
        outputs = await asyncio.gather(*(run(name) for name in prompts))
    finally:
        engine.shutdown()
    assert victims and set(victims) == {"low"}  # 3 x 70 tokens do not fit in 160
    for name, tokens in zip(prompts, outputs, strict=True):
        assert tokens == reference(tiny_bundle, prompts[name], 40)


@pytest.mark.parametrize("seed", [0])
async def test_thousand_streams_aborted_at_random_points_free_every_block(
    tmp_path: Path, tiny_bundle: ModelBundle, seed: int
) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path, memory={"budget_bytes": 8 * ONE_MIB}))
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(40)] for _ in range(3)]
    slots = asyncio.Semaphore(48)
    received: list[int] = []

    async def stream(index: int) -> None:
        ids = rng.choice(prefixes)[: rng.randrange(1, 41)] + [index % 256] * rng.randrange(0, 20)
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0, ignore_eos=True)
        stop_after = rng.randrange(0, 6)  # deltas read before closing the stream (0: before the first)
        cancel_after_s = rng.uniform(0.0, 0.2) if rng.random() < 0.5 else None
        async with slots:
            task = asyncio.ensure_future(consume(engine.generate(ids, params), stop_after, received))
            if cancel_after_s is not None:  # the client goes away mid-stream
                await asyncio.sleep(cancel_after_s)
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    engine.start()
    try:
        await asyncio.gather(*(stream(i) for i in range(1000)))

        async def idle() -> bool:
            return not engine.core.scheduler.has_work and engine.core.runner.kv.num_used_slots == 0

        await wait_until(idle, what="engine idle after the aborts")
    finally:
        engine.shutdown()
    assert received  # streams that were not cancelled read their deltas before closing
    assert engine.core.blocks.num_used_blocks == 0
    engine.core.blocks.check()
    cache = engine.core.memory.prefix_cache
    assert cache is not None
    cache.check()
    assert len(engine.core.runner.block_store) == cache.num_cached_blocks
    assert engine.core.blocks.num_free_blocks + cache.num_cached_blocks == engine.core.blocks.num_blocks


async def consume(deltas: AsyncIterator[RequestOutput], stop_after: int, received: list[int]) -> None:
    iterator = aiter(deltas)
    try:
        for index in range(stop_after):
            await iterator.__anext__()
            if index == 0:
                received.append(1)
    except StopAsyncIteration:
        pass
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]


def test_a_request_waits_for_a_shared_prefix_being_prefilled_instead_of_computing_it_twice() -> None:
    pool = BlockPool(64, 4)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64, max_num_seqs=8), pool, clock=lambda: 0,
                          prefix_cache=PrefixCache(pool))
    system = list(range(100, 132))  # eight blocks of four tokens, then each request's own question
    first, second, other = make_request("first", 0), make_request("second", 0), make_request("other", 0)
    first.prompt_token_ids, second.prompt_token_ids, other.prompt_token_ids = [*system, 1, 2], [*system, 3, 4], [5] * 6
    for request in (first, second, other):
        scheduler.add_request(request)
    plan = step(scheduler)
    assert [c.request.request_id for c in plan.chunks] == ["first", "other"]  # "other" shares nothing
    plan = step(scheduler)
    assert "second" in [c.request.request_id for c in plan.chunks]
    assert second.num_cached_tokens == len(system)  # computed once, by "first"
