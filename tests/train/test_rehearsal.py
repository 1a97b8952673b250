"""Rehearsal anchors: the base model's own greedy answers, served once by the engine's warm-up and cached,
ride along with the first micro-step of every optimizer step and never touch the journal or the drift."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mace.model.loader import ModelBundle, load_model
from mace.server.keys import RUNTIME
from mace.train.journal import Journal, NewSample
from mace.train.rehearsal import ANCHOR_QUESTIONS, AnchorStore
from mace.train.trainer import Trainer
from mace.train.work import TrainWork
from tests.conftest import start_server, tiny_config


async def test_warm_up_serves_the_anchors_greedily_once_per_model(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train={"policy": "mace", "rehearsal": True})
    bundle = load_model(config.model, config.cache_dir)
    runner, _ = await start_server(config, bundle)
    try:
        store = AnchorStore(config.data_dir / "rehearsal.json", "builtin:tiny:torch.float32")
        assert len(store.samples) == len(ANCHOR_QUESTIONS)  # cached for the next start
        anchor = store.samples[0]
        prompt = torch.tensor([anchor.token_ids[: anchor.num_prompt_tokens]])
        engine = runner.app[RUNTIME].engine
        assert engine is not None and engine.core.trainer is not None
        peft_model = engine.core.trainer.learner.peft_model  # the engine is idle: nothing else runs the model now
        with torch.no_grad(), peft_model.disable_adapter():
            greedy = peft_model.generate(input_ids=prompt, max_new_tokens=anchor.num_tokens - anchor.num_prompt_tokens,
                                    do_sample=False, attention_mask=torch.ones_like(prompt),
                                    pad_token_id=bundle.tokenizer.eos_token_id)
        assert greedy[0].tolist() == anchor.token_ids  # what version 0 serves: the engine's greedy answer
    finally:
        await runner.cleanup()


@pytest.fixture
def rehearsing(tmp_path: Path, tiny_bundle: ModelBundle) -> Iterator[Trainer]:
    config = tiny_config(tmp_path, train={"policy": "mace", "rehearsal": True})
    journal = Journal(tmp_path / "journal.sqlite3", config.train.heldout_every)
    trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
    yield trainer
    trainer.close()
    trainer.learner.peft_model.unload()
    journal.close()


def test_each_optimizer_step_carries_one_anchor_outside_the_journal(rehearsing: Trainer) -> None:
    trainer = rehearsing
    trainer.anchors.set([([1, 2, 3], [4, 5]), ([6, 7], [8])])
    trainer.journal.append([NewSample(f"question {i}?", f"answer {i}") for i in range(4)])
    trainer.ingest()
    while stages := trainer.upkeep_stages():
        trainer.run_work(TrainWork((stages[0],)))
        trainer.after_step()
    assert trainer.job_stages(max_job_tokens=10_000)
    job = trainer.tasks.job
    assert job is not None
    assert [s.sample_id < 0 for s in job.step.samples].count(True) == 1  # one anchor beside users' samples
    users = [s for s in job.step.samples if s.sample_id > 0]
    while trainer.tasks.job is not None or trainer.tasks.finished_jobs:
        trainer.run_work(TrainWork(tuple(trainer.job_stages(10_000)[:1])))
        trainer.after_step()
    trainer.flush()  # the journal's trained marks are written off the engine thread
    assert trainer.journal.counts().trained == len(users)  # anchors are never journal samples
    assert trainer.learner.num_accumulated in (0, len(users))  # the batch counts users' samples only
