"""Property tests of the block pool, the prefix cache and the training reservation (no tensors).

A model of the runner replays the cache's block copies on token lists instead of KV tensors, so
a prefix loaded into a request must read exactly that request's tokens: a wrong hash chain, a
block evicted before it was read, or a copy applied out of order would show as different tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mace.engine.kv_blocks import BlockPool
from mace.engine.memory import TRAIN_OWNER, MemoryPlan, TrainingReservation
from mace.engine.plan import BlockCopy
from mace.engine.prefix_cache import CACHE_OWNER, PrefixCache
from mace.engine.request import Request, SamplingParams

BLOCK_SIZE = 4
SYSTEM = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # a shared "system prompt" of two and a half blocks


def make_request(request_id: str, tokens: list[int], version: int = 0, priority: int = 0) -> Request:
    return Request(
        request_id=request_id, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=64),
        eos_token_ids=frozenset(), max_model_len=4096, arrival_time_s=0.0, adapter_version=version, priority=priority,
    )


class FakeRunner:
    """Applies BlockCopy logs to token lists the way the runner applies them to KV tensors."""

    def __init__(self) -> None:
        self.slots: dict[str, list[int]] = {}
        self.store: dict[int, list[int]] = {}

    def apply(self, copies: list[BlockCopy]) -> None:
        for copy in copies:
            if copy.kind == "save":
                start = copy.first_block * BLOCK_SIZE
                tokens = self.slots[copy.request_id][start : start + copy.num_tokens]
                assert len(tokens) == copy.num_tokens  # only computed positions are saved
                for index, block in enumerate(copy.block_ids):
                    self.store[block] = tokens[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
            elif copy.kind == "load":
                loaded = [t for block in copy.block_ids for t in self.store[block]]
                assert len(loaded) >= copy.num_tokens
                self.slots[copy.request_id] = loaded[: copy.num_tokens]
            else:
                for block in copy.block_ids:
                    del self.store[block]


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(24, BLOCK_SIZE, block_bytes=100)
        self.cache = PrefixCache(self.pool)
        plan = MemoryPlan(2400, 0, 0, training_bytes=400, training_bytes_per_token=10, kv_block_bytes=100)
        self.training = TrainingReservation(self.pool, plan)
        self.runner = FakeRunner()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_created = 0

    @rule(suffix=st.lists(st.integers(11, 14), min_size=1, max_size=12), shared=st.booleans(),
          version=st.integers(0, 1))
    def arrive(self, suffix: list[int], shared: bool, version: int) -> None:
        self.num_created += 1
        tokens = (SYSTEM if shared else []) + suffix
        self.waiting.append(make_request(f"r{self.num_created}", tokens, version))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.waiting))
        hit = self.cache.match(request)
        if not self.pool.grow(request.request_id, request.num_tokens):
            self.cache.unpin()
            return
        self.cache.commit(request, hit)
        self.runner.apply(self.cache.take_copies())
        loaded = self.runner.slots.get(request.request_id, [])
        assert loaded == request.token_ids_slice(0, request.num_computed_tokens)  # the hit is its own prefix
        # The forward pass computes the rest: the slot now holds all of its tokens.
        self.runner.slots[request.request_id] = request.token_ids_slice(0, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
        self.cache.save(request, request.num_prompt_tokens)
        self.waiting.remove(request)
        self.running.append(request)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(11, 14))
    def decode(self, data: st.DataObject, token: int) -> None:
        request = data.draw(st.sampled_from(self.running))
        if not self.pool.grow(request.request_id, request.num_tokens + 1):
            self.preempt(request)
            return
        request.append_output_token(token)
        self.runner.slots[request.request_id].append(token)
        request.num_computed_tokens += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.running))
        self.cache.save(request, request.num_computed_tokens)
        self.pool.free(request.request_id)
        self.running.remove(request)
        self.runner.apply(self.cache.take_copies())
        del self.runner.slots[request.request_id]

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt_one(self, data: st.DataObject) -> None:
        self.preempt(data.draw(st.sampled_from(self.running)))

    def preempt(self, request: Request) -> None:
        self.pool.free(request.request_id)
        request.num_computed_tokens = 0
        self.running.remove(request)
        self.runner.apply(self.cache.take_copies())
        del self.runner.slots[request.request_id]
        self.waiting.append(request)

    @rule(num_blocks=st.integers(1, 30))
    def evict(self, num_blocks: int) -> None:
        self.cache.reclaim(num_blocks)

    @rule()
    def train(self) -> None:
        assert self.training.max_tokens() == self.training.num_blocks * 100 // 10

    @invariant()
    def accounting_is_exact(self) -> None:
        self.runner.apply(self.cache.take_copies())
        self.pool.check()
        self.cache.check()
        owners = self.pool.owners()
        for request in self.running:
            assert len(owners[request.request_id]) == self.pool.blocks_for(request.num_tokens)
        assert set(owners) <= {r.request_id for r in self.running} | {CACHE_OWNER, TRAIN_OWNER}
        assert set(self.runner.store) == set(owners.get(CACHE_OWNER, []))  # tensors follow the accounting
        assert self.pool.num_used_blocks == sum(len(owners[r.request_id]) for r in self.running)
        assert self.training.num_blocks <= self.training.target_blocks

    def teardown(self) -> None:
        for request in list(self.running):
            self.preempt(request)
        self.cache.clear()
        self.training.reclaim(self.pool.num_blocks)
        self.runner.apply(self.cache.take_copies())
        assert self.pool.num_free_blocks == self.pool.num_blocks and not self.runner.store


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_version_is_part_of_the_key() -> None:
    pool = BlockPool(16, BLOCK_SIZE)
    cache = PrefixCache(pool)
    first = make_request("a", [*SYSTEM, 11], version=3)
    assert pool.grow("a", first.num_tokens)
    cache.commit(first, cache.match(first))
    first.num_computed_tokens = first.num_tokens
    cache.save(first, first.num_tokens)
    assert cache.num_cached_blocks == 3  # two whole blocks and the partial [9, 10, 11]
    assert cache.match(make_request("b", [*SYSTEM, 12], version=3)).num_tokens == 10
    cache.unpin()
    assert cache.match(make_request("c", [*SYSTEM, 12], version=4)).num_tokens == 0


def cached(pool: BlockPool, cache: PrefixCache, name: str, tokens: list[int]) -> None:
    """`tokens` computed by request `name`, which finishes and offers them all to the cache."""
    request = make_request(name, tokens)
    assert pool.grow(name, len(tokens))
    request.num_computed_tokens = len(tokens)
    cache.save(request, len(tokens))
    pool.free(name)


@pytest.mark.parametrize(("tokens", "num_hit"), [
    ([*SYSTEM, 12, 13], 10),  # two whole blocks, then two tokens of the cached partial block
    ([*SYSTEM, 11], 10),  # the same prompt again: its last token still runs, for the logits
    ([*SYSTEM, 11, 12], 11),  # the partial block lent whole
    ([1, 2, 3, 4, 5, 6, 99], 6),  # a whole cached block lent in part
    ([1, 2, 99], 2),  # the first block lent in part
    ([99, 1, 2], 0),
])
def test_a_hit_reaches_the_exact_token(tokens: list[int], num_hit: int) -> None:
    pool = BlockPool(16, BLOCK_SIZE)
    cache = PrefixCache(pool)
    cached(pool, cache, "first", [*SYSTEM, 11])
    request = make_request("next", tokens)
    hit = cache.match(request)
    assert hit.num_tokens == num_hit
    assert pool.grow("next", request.num_tokens)
    cache.commit(request, hit)
    assert request.num_computed_tokens == request.num_cached_tokens == num_hit
    assert (cache.num_hit_tokens, cache.num_queried_tokens) == (num_hit, len(tokens))
    loads = [copy for copy in cache.take_copies() if copy.kind == "load"]
    assert [copy.num_tokens for copy in loads] == ([num_hit] if num_hit else [])
    cache.check()


def test_whole_blocks_only_when_partial_sharing_is_off() -> None:
    pool = BlockPool(16, BLOCK_SIZE)
    cache = PrefixCache(pool)
    cache.share_partial_blocks = False
    cached(pool, cache, "first", [*SYSTEM, 11])
    assert cache.num_cached_blocks == 2
    assert cache.match(make_request("next", [*SYSTEM, 11, 12])).num_tokens == 8


def test_a_longer_partial_block_supersedes_the_shorter_and_a_covered_one_is_not_saved() -> None:
    pool = BlockPool(16, BLOCK_SIZE)
    cache = PrefixCache(pool)
    cached(pool, cache, "short", [1, 2, 3, 4, 5])
    cached(pool, cache, "long", [1, 2, 3, 4, 5, 6, 7])  # the same block, extended: saved as a new block
    assert cache.num_cached_blocks == 2
    cached(pool, cache, "covered", [1, 2, 3, 4, 5, 6])  # its tokens are lent by "long"'s block
    assert cache.num_cached_blocks == 2
    cached(pool, cache, "whole", [1, 2, 3, 4, 5, 6, 7, 8])  # a whole block supersedes the partial too
    assert cache.num_cached_blocks == 2
    assert cache.match(make_request("next", [1, 2, 3, 4, 5, 6, 7, 8, 9])).num_tokens == 8
    drops = [block for copy in cache.take_copies() if copy.kind == "drop" for block in copy.block_ids]
    assert len(drops) == 2
    cache.unpin()
    cache.check()
    pool.check()


def test_reclaim_evicts_least_recent_leaf_first_and_spares_pinned() -> None:
    pool = BlockPool(8, BLOCK_SIZE)
    cache = PrefixCache(pool)
    for name, tokens in (("old", [20] * 8), ("new", [30] * 8)):
        request = make_request(name, tokens)
        assert pool.grow(name, 8)
        request.num_computed_tokens = 8
        cache.save(request, 8)
        pool.free(name)
    assert cache.num_cached_blocks == 4
    pinned = cache.match(make_request("reader", [20] * 8 + [1]))
    assert len(pinned.keys) == 2
    assert cache.reclaim(4) == 2  # only "new"'s blocks: "old" is pinned by the admission in progress
    cache.commit(make_request("reader", [20] * 8 + [1]), pinned)
    assert cache.reclaim(1) == 1
    cache.check()
    pool.check()


def test_allocation_reclaims_cache_then_training_before_failing() -> None:
    pool = BlockPool(10, BLOCK_SIZE, block_bytes=100)
    cache = PrefixCache(pool)
    plan = MemoryPlan(1000, 0, 0, training_bytes=400, training_bytes_per_token=10, kv_block_bytes=100)
    training = TrainingReservation(pool, plan)
    cached = make_request("cached", [5] * 8)
    assert pool.grow("cached", 8)
    cached.num_computed_tokens = 8
    cache.save(cached, 8)
    pool.free("cached")
    assert (training.num_blocks, cache.num_cached_blocks, pool.num_free_blocks) == (4, 2, 4)
    assert pool.grow("a", 6 * BLOCK_SIZE)  # free, then the cache
    assert (training.num_blocks, cache.num_cached_blocks) == (4, 0)
    assert pool.grow("b", 3 * BLOCK_SIZE)  # then training shrinks
    assert training.num_blocks == 1 and training.max_tokens() == 10
    assert not pool.grow("c", 2 * BLOCK_SIZE)  # nothing changes when even reclaiming is not enough
    assert training.num_blocks == 1
    pool.free("a")
    assert training.max_tokens() == 40  # grows back from free blocks
    pool.check()


def test_empty_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"memory\.budget_bytes"):
        BlockPool(0, BLOCK_SIZE)
