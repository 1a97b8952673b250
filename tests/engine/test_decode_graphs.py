"""Decode steps at fixed shapes (engine/decode_graphs.py): padded to a batch bucket, attending over a
length bucket, each row through its own adapter version. On a CPU the padded forward runs eagerly and
must give the eager path's greedy tokens; where CUDA exists, the captured graphs must too."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mace.engine.core import EngineCore
from mace.engine.decode_graphs import GraphKey, StaticDecode, batch_buckets, length_bucket
from mace.engine.inbox import AddRequest
from mace.engine.request import Request, SamplingParams
from mace.model.loader import ModelBundle
from tests.conftest import tiny_config
from tests.engine.test_mixed_adapters import PROMPTS, engine_core

REQUEST_IDS = (f"g{i}" for i in itertools.count())


def generate(core: EngineCore, jobs: list[tuple[str, int, int]]) -> list[list[int]]:
    """Greedy tokens of (prompt, adapter version, max tokens) jobs admitted together. Different
    lengths finish at different steps, so later steps run fewer rows than their bucket (padding)."""
    requests = [Request(request_id=next(REQUEST_IDS), prompt_token_ids=core.bundle.tokenizer.encode(prompt),
                        adapter_version=version,
                        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                        eos_token_ids=core.bundle.eos_token_ids, max_model_len=1024, arrival_time_s=0.0)
                for prompt, version, max_tokens in jobs]
    for request in requests:
        core.handle(AddRequest(request))
    tokens: dict[str, list[int]] = {request.request_id: [] for request in requests}
    while any(not request.status.is_finished for request in requests):
        for output in core.step():
            assert output.error is None, output.error
            tokens[output.request_id].extend(output.new_token_ids)
    core.release_idle()
    return [tokens[request.request_id] for request in requests]


def jobs_of(versions: list[int]) -> list[tuple[str, int, int]]:
    return [(prompt, version, 4 + 3 * index) for index, (prompt, version) in enumerate(zip(PROMPTS, versions,
                                                                                           strict=True))]


@pytest.mark.parametrize("versions", [[1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 0, 8, 1, 0, 5, 2], [0] * 8],
                         ids=["eight-versions", "base-rows-mixed-in", "base-only"])
def test_padded_static_decode_equals_eager(tmp_path: Path, tiny_bundle: ModelBundle, versions: list[int]) -> None:
    jobs = jobs_of(versions)
    with engine_core(tmp_path, tiny_bundle, 256) as core:
        eager = generate(core, jobs)
        core.runner.static_decode = static = StaticDecode(core.runner, 64, capture=False)
        padded = generate(core, jobs)
        core.runner.static_decode = None
    assert padded == eager
    # Every decode step after the prompts went through the padded path (8 rows, then fewer).
    assert static.num_steps >= max(max_tokens for _, _, max_tokens in jobs) - 2


def test_padded_static_decode_without_a_trainer(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, engine={"scheduling": "fcfs"})
    core = EngineCore(tiny_bundle, config)
    jobs = jobs_of([0] * 8)
    eager = generate(core, jobs)
    core.runner.static_decode = static = StaticDecode(core.runner, 16, capture=False)
    assert generate(core, jobs) == eager
    assert static.num_steps > 0


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]
    assert [length_bucket(n, 2048) for n in (1, 256, 257, 1500)] == [256, 256, 512, 2048]
    assert length_bucket(300, 300) == 300  # never past the cache's capacity


def test_a_padded_bucket_needs_a_free_slot_inside_it(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """Padding rows write their KV into a slot no request holds; with every slot of a bucket held, the
    step takes the next bucket; past the largest, it runs eagerly."""
    core = EngineCore(tiny_bundle, tiny_config(tmp_path, engine={"scheduling": "fcfs"}))
    static = StaticDecode(core.runner, 8, capture=False)
    kv = core.runner.kv
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for index in range(4):
            kv.ensure(f"held-{index}", 10)
    inputs = _decode_inputs(core, rows=3, attended_length=10)
    # 4 slots held, 3 decode: bucket 4 has no free slot to pad into.
    assert static.key_for(inputs) == GraphKey(8, 256, adapters=False)
    assert static.key_for(inputs, ["__base__"] * 3) == GraphKey(8, 256, adapters=False)
    assert static.key_for(inputs, ["__base__", "slot1", "__base__"]) == GraphKey(8, 256, adapters=True)
    assert static.key_for(_decode_inputs(core, rows=4, attended_length=10)) == GraphKey(4, 256, adapters=False)
    with torch.inference_mode():
        for index in range(4, 8):
            kv.ensure(f"held-{index}", 10)
    assert static.key_for(_decode_inputs(core, rows=7, attended_length=10)) is None


def _decode_inputs(core: EngineCore, rows: int, attended_length: int):  # type: ignore[no-untyped-def]
    from mace.engine.runner import _StepInputs

    zeros = torch.zeros(rows, dtype=torch.long)
    return _StepInputs(input_ids=zeros, positions=zeros, kv_index=zeros, slots=zeros, singles=[], multis=[],
                       single_slots=zeros, slot_lengths=torch.ones(core.runner.kv.num_used_slots, dtype=torch.long),
                       num_singles=rows, attended_slots=core.runner.kv.num_used_slots,
                       attended_length=attended_length)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_eager(tmp_path: Path) -> None:
    """On a GPU: the engine as configured there (graphs on) against the same engine with graphs off,
    mixed adapter versions, batch sizes falling through the buckets as requests finish."""
    from mace.model.loader import load_model

    config = tiny_config(tmp_path, model={"device": "cuda", "dtype": "float32"})
    bundle = load_model(config.model, config.cache_dir)
    versions = [0, 3, 0, 8, 1, 0, 5, 2]
    with engine_core(tmp_path, bundle, 256) as core:
        eager_static, core.runner.static_decode = core.runner.static_decode, None
        eager = generate(core, jobs_of(versions))
        core.runner.static_decode = eager_static
        assert eager_static is not None and eager_static.num_graphs > 0  # captured at start
        graphs = generate(core, jobs_of(versions))
    assert graphs == eager
    assert eager_static.num_steps > 0


def test_graphs_go_stale_when_what_they_baked_in_moves(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """A graph reads the KV cache's and the adapter stacks' memory as it was at capture: a grown cache
    or re-stacked adapter slots drop every graph (they are recaptured on next use)."""
    with engine_core(tmp_path, tiny_bundle, 256) as core:
        static = StaticDecode(core.runner, 8, capture=False)
        learner = core.runner.trainer_learner()
        assert learner is not None
        static._drop_if_stale()
        static._graphs[GraphKey(8, 256)] = object()  # type: ignore[assignment]  # stands for a captured graph
        static._drop_if_stale()
        assert static.num_graphs == 1  # nothing moved
        with torch.inference_mode():
            core.runner.kv.ensure("long", core.runner.kv.capacity + 1)  # the cache grows: new tensors
        static._drop_if_stale()
        assert static.num_graphs == 0
        static._graphs[GraphKey(8, 512)] = object()  # type: ignore[assignment]
        generation = learner.stacks_generation
        for version in range(100, 101 + len(learner._free_slots)):  # one version more than free slots
            learner.install_version(version, learner.version_weights(1))
        assert learner.stacks_generation > generation
        static._drop_if_stale()
        assert static.num_graphs == 0
