"""Warm-up before ready: the latency model has measured this machine, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

from mace.engine.engine import Engine
from mace.engine.latency import StepShape
from mace.engine.request import SamplingParams
from mace.engine.warmup import warm_up
from mace.model.loader import ModelBundle
from tests.conftest import tiny_config


async def test_warm_up_measures_prefill_and_decode_and_leaves_the_engine_idle(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    engine = Engine(tiny_bundle, tiny_config(tmp_path))
    assert not engine.scheduler.latency.is_measured(StepShape(16, 2))
    report = warm_up(engine)
    assert report.steps > 0
    assert report.max_decodes >= 8  # the burst decoded as a batch: the fit can tell a decode's cost apart
    latency = engine.scheduler.latency
    assert latency.is_measured(StepShape(16, 2))
    assert latency.guard.num_missed == latency.guard.num_met == 0
    assert not engine.scheduler.has_work
    assert engine.blocks.num_used_blocks == 0 and engine.runner.kv.num_used_slots == 0
    cache = engine.memory.prefix_cache
    assert cache is not None and cache.num_cached_blocks == 0
    engine.start()
    try:  # and it serves as before
        deltas = [d async for d in engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_cached_tokens == 0
    finally:
        engine.shutdown()
