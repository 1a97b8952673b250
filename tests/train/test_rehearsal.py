"""Rehearsal anchors: the base model's own greedy answers, generated once per model, ride along with the
first micro-step of every optimizer step and never touch the journal or the drift signal."""

from __future__ import annotations

from pathlib import Path

import torch

from mace.model.loader import ModelBundle
from mace.train.journal import NewSample
from mace.train.rehearsal import ANCHOR_QUESTIONS, anchors
from mace.train.trainer import Trainer
from mace.train.work import TrainWork


def test_anchors_are_the_base_models_greedy_answers_and_are_cached(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    model, tokenizer = tiny_bundle.causal_lm, tiny_bundle.tokenizer
    cache = tmp_path / "rehearsal.json"
    first = anchors(model, tokenizer, cache, "tiny:float32")
    assert len(first) == len(ANCHOR_QUESTIONS) and cache.is_file()
    anchor = first[0]
    prompt = torch.tensor([anchor.token_ids[: anchor.num_prompt_tokens]])
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=anchor.num_tokens - anchor.num_prompt_tokens, do_sample=False,
                                attention_mask=torch.ones_like(prompt), pad_token_id=tokenizer.eos_token_id)
    assert greedy[0].tolist() == anchor.token_ids
    again = anchors(None, None, cache, "tiny:float32")  # no model needed: read from the cache
    assert [a.token_ids for a in again] == [a.token_ids for a in first]
    assert all(a.sample_id < 0 for a in first)


def test_each_optimizer_step_carries_one_anchor_outside_the_journal(trainer: Trainer) -> None:
    trainer.journal.append([NewSample(f"question {i}?", f"answer {i}") for i in range(4)])
    trainer.ingest()
    while stages := trainer.upkeep_stages():
        trainer.run_work(TrainWork((stages[0],)))
        trainer.after_step()
    stages = trainer.job_stages(max_job_tokens=10_000)
    job = trainer._job
    assert job is not None and stages
    assert [s.sample_id < 0 for s in job.samples].count(True) == 1  # one anchor beside users' samples
    users = [s for s in job.samples if s.sample_id > 0]
    while trainer._job is not None or trainer._finished_jobs:
        trainer.run_work(TrainWork(tuple(trainer.job_stages(10_000)[:1])))
        trainer.after_step()
    counts = trainer.journal.counts()
    assert counts.trained == len(users)  # anchors are never journal samples
    assert trainer.learner.num_accumulated in (0, len(users))  # the batch counts users' samples only
