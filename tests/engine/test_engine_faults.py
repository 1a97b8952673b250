"""An exception in one step's forward fails only that step's requests; the engine keeps serving.
Admission refuses in one order, and counts what it admits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mace.engine.admission import Overloaded, RequestRejected, ShuttingDown
from mace.engine.frontend import AsyncEngine
from mace.engine.plan import IterationPlan, RunnerOutput
from mace.engine.request import SamplingParams
from mace.model.loader import ModelBundle, load_model
from tests.conftest import tiny_config, wait_until


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


async def test_a_failed_idle_release_does_not_end_the_engine_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bundle: ModelBundle
) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    real_run = engine.core.runner.run
    calls = {"idle_failures": 0}

    def run_failing_when_idle(plan: IterationPlan) -> RunnerOutput:
        if not plan.chunks and plan.train is None and calls["idle_failures"] < 3:
            calls["idle_failures"] += 1
            raise RuntimeError("simulated failure while idle")
        return real_run(plan)

    monkeypatch.setattr(engine.core.runner, "run", run_failing_when_idle)
    engine.start()
    try:
        await wait_until(lambda: asyncio.sleep(0, calls["idle_failures"] >= 1), what="an idle release to fail")
        assert engine.is_running
        deltas = [d async for d in engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))]
        assert deltas[-1].finish_reason == "length"
    finally:
        engine.shutdown()


async def test_admission_checks_in_order_and_counts_generations(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, engine={"max_num_seqs": 1}, server={"max_waiting_requests": 1})
    engine = AsyncEngine(tiny_bundle, config)
    with pytest.raises(RequestRejected) as rejected:
        engine.admit(engine.max_model_len, None, "gold")  # both wrong: the prompt is checked first
    assert rejected.value.param == "messages"
    with pytest.raises(RequestRejected) as rejected:
        engine.admit(4, engine.max_model_len, None)
    assert rejected.value.param == "max_tokens"
    with pytest.raises(RequestRejected) as rejected:
        engine.admit(4, None, "gold")
    assert rejected.value.code == "invalid_slo_class"
    first, second = engine.admit(4, None, None), engine.admit(4, None, "batch")
    assert (first.slo_class, second.slo_class, engine.num_generations) == ("interactive", "batch", 2)
    with pytest.raises(Overloaded) as overloaded:
        engine.admit(4, None, None)
    assert overloaded.value.code == "queue_full"
    first.release()
    first.release()  # a ticket gives its place back once
    assert engine.num_generations == 1
    with engine.admit(4, None, None):
        assert engine.num_generations == 2
    assert engine.num_generations == 1
    engine.close_admission()
    with pytest.raises(ShuttingDown):
        engine.admit(engine.max_model_len, None, "gold")  # shutdown before anything else
