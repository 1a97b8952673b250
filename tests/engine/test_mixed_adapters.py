"""Mixed-version batches through the engine: 8 requests on 8 adapter versions (of one lineage, or of 8
tenants' lineages), decoded together, give the greedy tokens each gives alone."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mace.engine.core import EngineCore
from mace.engine.inbox import AddRequest
from mace.engine.request import Request, SamplingParams
from mace.model.loader import ModelBundle
from mace.train.journal import Journal
from mace.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.model.test_multi_lora import publish_random_versions

MAX_TOKENS = 10
PROMPTS = ["Hi", "What is the capital of France?", "1 2 3 4 5 6 7 8", "Tell me a story about a dragon.",
           "Write a haiku about the sea.", "Summarise: the fox jumps.", "Name three colours.", "Why?"]
REQUEST_IDS = (f"r{i}" for i in itertools.count())


@contextmanager
def engine_core(tmp_path: Path, bundle: ModelBundle, batched_tokens: int) -> Iterator[EngineCore]:
    """An engine core on the tiny model with versions 1..8 published, all kept loaded; no engine thread."""
    # fcfs: no TPOT-bound decode cap, so all 8 decode together on a slow, shared machine too.
    config = tiny_config(tmp_path, engine={"max_num_batched_tokens": batched_tokens, "scheduling": "fcfs"},
                         train={"policy": "mace", "max_versions_loaded": 8})
    journal = Journal(tmp_path / "journal.sqlite3", config.train.heldout_every)
    trainer = Trainer(bundle.causal_lm, bundle.tokenizer, journal, config)
    try:
        publish_random_versions(trainer.learner, 8)
        yield EngineCore(bundle, config, trainer)
    finally:
        trainer.close()
        trainer.learner.peft_model.unload()
        journal.close()


def generate(core: EngineCore, jobs: list[tuple[str, int]], tenants: list[str] | None = None) -> list[list[int]]:
    """Greedy tokens of (prompt, adapter version) jobs admitted together, stepping the core by hand;
    job i's version is of `tenants[i]`'s lineage (default: the shared one)."""
    tokenizer = core.bundle.tokenizer
    tenants = tenants or [""] * len(jobs)
    requests = [Request(request_id=next(REQUEST_IDS), prompt_token_ids=tokenizer.encode(prompt),
                        adapter_version=version, tenant=tenant,
                        sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        eos_token_ids=core.bundle.eos_token_ids, max_model_len=1024, arrival_time_s=0.0)
                for (prompt, version), tenant in zip(jobs, tenants, strict=True)]
    for request in requests:
        core.handle(AddRequest(request))
    tokens: dict[str, list[int]] = {request.request_id: [] for request in requests}
    finished: set[str] = set()
    batch_sizes: list[int] = []
    while len(finished) < len(requests):
        outputs = core.step()
        batch_sizes.append(len(core.last_plan.chunks) if core.last_plan is not None else 0)
        for output in outputs:
            assert output.error is None, output.error
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finished.add(output.request_id)
    core.release_idle()  # what the engine loop does when it runs out of work
    assert max(batch_sizes) == len(jobs)  # the requests did run together
    return [tokens[request.request_id] for request in requests]


# 24 batched tokens a step: prompts prefill in chunks beside other versions' decodes.
@pytest.mark.parametrize(("versions", "batched_tokens"), [([1, 2, 3, 4, 5, 6, 7, 8], 256),
                                                          ([0, 3, 0, 8, 1, 0, 5, 2], 24)],
                         ids=["eight-versions", "base-rows-mixed-in-chunked"])
def test_mixed_batch_equals_each_request_alone(tmp_path: Path, tiny_bundle: ModelBundle, versions: list[int],
                                               batched_tokens: int) -> None:
    jobs = list(zip(PROMPTS, versions, strict=True))
    with engine_core(tmp_path, tiny_bundle, batched_tokens) as core:
        together = generate(core, jobs)
        alone = [generate(core, [job])[0] for job in jobs]
        base = generate(core, [(prompt, 0) for prompt in PROMPTS])
    assert together == alone
    # The versions answer differently from the base model: the equality above is not vacuous.
    assert sum(a != b for a, b in zip(alone, base, strict=True)) >= sum(v != 0 for v in versions) - 1


def test_eight_tenants_versions_in_one_batch_equal_each_alone(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """Every tenant's lineage has its own version 1: a row is told apart by its lineage, not its number."""
    tenants = [f"tenant-{i}" for i in range(len(PROMPTS))]
    with engine_core(tmp_path, tiny_bundle, 256) as core:
        trainer = core.trainer
        assert trainer is not None
        generator = torch.Generator().manual_seed(11)
        for tenant in tenants:  # each tenant's learner on the model in turn, published by its own gate
            lineage = trainer.resident(tenant)
            trainer._lend_learner(lineage)
            with torch.no_grad():
                for param in trainer.learner._learner_params():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            assert lineage.gate.publish(serving_loss=2.0, learner_loss=1.0, reason="test") == 1
        jobs = [(prompt, 1) for prompt in PROMPTS]
        together = generate(core, jobs, tenants)
        alone = [generate(core, [job], [tenant])[0] for job, tenant in zip(jobs, tenants, strict=True)]
        shared = generate(core, jobs)  # the shared lineage's version 1: another adapter again
    assert together == alone
    assert sum(a != b for a, b in zip(alone, shared, strict=True)) >= len(PROMPTS) - 1
