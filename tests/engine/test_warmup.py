"""Warm-up before ready: the latency model has measured this machine, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog.testing
import torch

from mace.engine.frontend import AsyncEngine
from mace.engine.latency import StepShape
from mace.engine.request import SamplingParams
from mace.engine.warmup import warm_up
from mace.model.loader import ModelBundle
from mace.train.journal import Journal, NewSample
from mace.train.trainer import Trainer
from tests.conftest import tiny_config, wait_until


async def test_warm_up_measures_prefill_and_decode_and_leaves_the_engine_idle(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    assert not engine.core.scheduler.latency.is_measured(StepShape(16, 2))
    report = warm_up(engine.core)
    assert report.steps > 0
    assert report.max_decodes >= 8  # the burst decoded as a batch: the fit can tell a decode's cost apart
    latency = engine.core.scheduler.latency
    assert latency.is_measured(StepShape(16, 2))
    assert latency.guard.num_missed == latency.guard.num_met == 0
    assert not engine.core.scheduler.has_work
    assert engine.core.blocks.num_used_blocks == 0 and engine.core.runner.kv.num_used_slots == 0
    cache = engine.core.memory.prefix_cache
    assert cache is not None and cache.num_cached_blocks == 0
    engine.start()
    try:  # and it serves as before
        deltas = [d async for d in engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_cached_tokens == 0
    finally:
        engine.shutdown()


async def test_warm_up_measures_training_beside_serving_and_learns_nothing(
    tmp_path: Path, tiny_bundle: ModelBundle
) -> None:
    config = tiny_config(tmp_path, train={"policy": "mace"})
    journal = Journal(tmp_path / "journal.sqlite3", config.train.heldout_every)
    trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
    engine = AsyncEngine(tiny_bundle, config, trainer)
    try:
        learner = trainer.learner
        weights_before = [p.detach().clone() for p in learner._learner_params()]
        beside_decodes = StepShape(0, 2, num_train_forward_tokens=64, num_train_backward_tokens=64,
                                   num_train_head_tokens=8)
        assert not engine.core.scheduler.latency.is_measured(beside_decodes)
        warm_up(engine.core)
        assert engine.core.scheduler.latency.is_measured(beside_decodes)
        assert not trainer.is_warming_up and not engine.core.scheduler.has_work
        assert all(p.grad is None for p in learner._learner_params())
        assert learner.num_accumulated == learner.num_optimizer_steps == 0
        for before, after in zip(weights_before, learner._learner_params(), strict=True):
            assert torch.equal(before, after)
        assert trainer.train_tokens_total == 0 and trainer.train_seconds_total == 0
        assert journal.counts().total == 0
    finally:
        engine.shutdown()
        trainer.learner.peft_model.unload()
        journal.close()


@pytest.mark.parametrize("train_thread", [False, True])
async def test_warm_up_leaves_samples_from_before_a_restart_to_the_served_loop(
    tmp_path: Path, tiny_bundle: ModelBundle, train_thread: bool
) -> None:
    """A restart's pending samples wait for warm-up's synthetic micro-steps: one of theirs opened
    between two of those would still be open when warm-up opens the next (on its own thread, training
    is measured alone too). Then they are trained without a POST."""
    config = tiny_config(tmp_path, train={"policy": "mace"}, engine={"train_thread": train_thread})
    journal = Journal(tmp_path / "journal.sqlite3", config.train.heldout_every)
    journal.append([NewSample(f"question {i}", f"answer {i}") for i in range(8)])
    trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
    engine = AsyncEngine(tiny_bundle, config, trainer)
    try:
        trainer.ingest()
        warm_up(engine.core)
        assert not trainer.is_warming_up and journal.counts().trained == 0
        engine.start()
        await wait_until(lambda: _trained_some(journal), timeout_s=120, what="the pending samples to be trained")
    finally:
        engine.shutdown()
        trainer.learner.peft_model.unload()
        journal.close()


async def _trained_some(journal: Journal) -> bool:
    return journal.counts().trained > 0


def test_debug_logging_gives_a_line_per_engine_step(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    engine = AsyncEngine(tiny_bundle, tiny_config(tmp_path))
    with structlog.testing.capture_logs() as logs:
        report = warm_up(engine.core)
    steps = [entry for entry in logs if entry["event"] == "engine step"]
    assert len(steps) == report.steps
    assert all(entry["time_s"] > 0 and entry["margin_s"] >= 0 for entry in steps)
    # What the SLO decode cap was and how much of the margin the TPOT guard held, step by step.
    assert all(entry["decode_cap"] >= 1 and entry["guard_extra_s"] >= 0 for entry in steps)
    # A fitted model may zero a coefficient on a noisy machine, so one prediction can be 0, never negative.
    assert all(entry["predicted_s"] >= 0 for entry in steps) and max(entry["predicted_s"] for entry in steps) > 0
    assert sum(entry["prefill"] for entry in steps) > 0 and max(entry["decode"] for entry in steps) >= 8
