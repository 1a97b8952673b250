"""An exception in one step's forward fails only that step's requests; the engine keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from mace.engine.frontend import AsyncEngine
from mace.engine.plan import IterationPlan, RunnerOutput
from mace.engine.request import SamplingParams
from mace.model.loader import load_model
from tests.conftest import tiny_config


async def test_failed_forward_fails_its_requests_then_engine_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path)
    engine = AsyncEngine(load_model(config.model, config.cache_dir), config)
    real_run = engine.core.runner.run
    calls = {"n": 0}

    def flaky_run(plan: IterationPlan) -> RunnerOutput:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real_run(plan)

    monkeypatch.setattr(engine.core.runner, "run", flaky_run)
    engine.start()
    try:
        deltas = [d async for d in engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))]
        assert deltas[-1].finish_reason == "error"
        assert deltas[-1].error is not None and "simulated kernel failure" in deltas[-1].error
        after = [d async for d in engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))]
        assert after[-1].finish_reason == "length" and after[-1].num_output_tokens == 5
        assert engine.core.blocks.num_used_blocks == 0
    finally:
        engine.shutdown()
