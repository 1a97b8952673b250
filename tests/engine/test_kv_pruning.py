"""KV pruning: the runner's pruned attention equals transformers on a cache cut to the same positions;
the scheduler prunes instead of preempting, and keeps each sequence within its KV budget."""

from __future__ import annotations

from pathlib import Path

import torch

from mace.config import EngineConfig, MemoryConfig
from mace.engine.frontend import AsyncEngine
from mace.engine.kv_blocks import BlockPool
from mace.engine.kv_pruning import KVPruner
from mace.engine.plan import IterationPlan, KVPrune, ScheduledChunk
from mace.engine.request import Request, SamplingParams
from mace.engine.runner import ModelRunner
from mace.engine.scheduler import Scheduler
from mace.model.loader import ModelBundle
from tests.conftest import tiny_config
from tests.engine.test_scheduler import make_request, step


def test_pruned_decode_equals_transformers_on_the_same_kept_positions(tiny_bundle: ModelBundle) -> None:
    model = tiny_bundle.causal_lm
    runner = ModelRunner(model, 256, tiny_bundle.device)
    runner.kv.enable_importance()
    prompt = [(7 * i) % 250 + 3 for i in range(60)]
    request = Request("r", prompt, SamplingParams(max_tokens=8, temperature=0), frozenset(), 256, 0.0)
    token = runner.run(IterationPlan(chunks=[ScheduledChunk.of(request, 60)])).sampled_token_ids["r"]
    request.num_computed_tokens = 60
    kept: list[torch.Tensor] = []
    real_prune = runner.kv.prune

    def spy(request_id: str, keep: torch.Tensor, num_kv_tokens: int) -> None:
        kept.append(keep.clone())
        real_prune(request_id, keep, num_kv_tokens)

    runner.kv.prune = spy  # type: ignore[method-assign]
    request.num_pruned_tokens = 60 - 24
    runner.run(IterationPlan(chunks=[], kv_prunes=[KVPrune("r", 60, 24, num_sink=4, num_recent=8)]))
    keep = kept[0]  # [layers, kv_heads, 24]: each head of each layer keeps its own positions
    assert keep.shape[-1] == 24 and bool((keep[..., 1:] > keep[..., :-1]).all())
    assert (keep[..., :4] == torch.arange(4)).all() and (keep[..., -8:] == torch.arange(52, 60)).all()
    assert len({tuple(row) for row in keep.flatten(0, 1).tolist()}) > 1

    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values
        for layer, positions in zip(cache.layers, keep, strict=True):  # the same cut of transformers' cache
            index = positions[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        for position in range(60, 68):  # decode over the pruned KV, one token at a time
            request.append_output_token(token)
            sampled = runner.run(IterationPlan(chunks=[ScheduledChunk.of(request, 1)])).sampled_token_ids["r"]
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, position_ids=torch.tensor([[position]]))
            assert sampled == int(logits.logits[0, -1].argmax())
            request.num_computed_tokens = position + 1
            token = sampled
    assert request.num_kv_tokens == 24 + 8


def test_memory_short_prunes_the_request_instead_of_preempting() -> None:
    pool = BlockPool(8, 4)
    memory = MemoryConfig(kv_pruning=True, prune_sink_tokens=1, prune_recent_tokens=3, prune_keep_ratio=0.5)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=256, max_num_seqs=8), pool, clock=lambda: 0,
                          pruner=KVPruner(memory, pool))
    for name in ("a", "b"):
        scheduler.add_request(make_request(name, 16, max_tokens=30))
    step(scheduler)  # 4 + 4 blocks: memory is full
    plan = step(scheduler)  # "a" needs a fifth block: it prunes itself to 8 tokens
    assert plan.preempted_request_ids == []
    assert [p.request_id for p in plan.kv_prunes] == ["a"] and plan.kv_prunes[0].keep_tokens == 8
    a = scheduler.running[0]
    assert a.num_kv_tokens == 8 + 1 and pool.num_blocks_of("a") == 3  # 8 kept, and the token this step added
    pool.check()


def test_sequences_stay_within_their_kv_budget(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, memory={"kv_pruning": True, "prune_seq_tokens": 64})
    engine = AsyncEngine(tiny_bundle, config)
    for index in range(3):
        engine.core.scheduler.add_request(Request(
            f"r{index}", [index + 3] * 100, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
            frozenset(), engine.max_model_len, 0.0,
        ))
    num_pruned = 0
    while engine.core.scheduler.has_work:
        plan = engine.core.scheduler.schedule()
        for chunk in plan.chunks:
            if chunk.is_decode:  # a whole prompt goes in first; the step after, it is pruned
                assert chunk.request.num_kv_tokens + 1 <= 64
                assert engine.core.blocks.num_blocks_of(chunk.request.request_id) <= 64 // 16
        engine.core.scheduler.update(plan, engine.core.runner.run(plan))
        num_pruned += len(plan.kv_prunes)
    assert num_pruned >= 3 * 2
    assert engine.core.blocks.num_used_blocks == 0
    engine.core.blocks.check()
