"""Scheduler behaviour with fake requests and a fake runner output: no tensors, no model."""

from __future__ import annotations

from mace.config import EngineConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.latency import StepShape
from mace.engine.plan import IterationPlan, RunnerOutput
from mace.engine.request import Request, RequestStatus, SamplingParams
from mace.engine.scheduler import Scheduler

EOS = 0


def make_request(request_id: str, num_prompt: int, max_tokens: int = 4) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(1, num_prompt + 1)),
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0),
        eos_token_ids=frozenset({EOS}),
        max_model_len=4096,
        arrival_time_s=0.0,
    )


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **engine: int) -> Scheduler:
    config = EngineConfig(**{"max_num_batched_tokens": 32, "max_num_seqs": 8, **engine})
    return Scheduler(config, BlockPool(num_blocks, block_size), clock=lambda: 0.0)


def fake_run(plan: IterationPlan, token: int = 7) -> RunnerOutput:
    sampled = {c.request.request_id: token for c in plan.chunks if c.samples_token}
    return RunnerOutput(sampled_token_ids=sampled, forward_time_s=0.0)


def step(scheduler: Scheduler, token: int = 7) -> IterationPlan:
    plan = scheduler.schedule()
    scheduler.update(plan, fake_run(plan, token))
    return plan


def test_token_budget_chunks_long_prompt_and_keeps_decoding() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    short = make_request("short", 4, max_tokens=10)
    scheduler.add_request(short)
    step(scheduler)  # prefill of `short` samples its first token
    scheduler.add_request(make_request("long", 40))
    plan = step(scheduler)
    sizes = {c.request.request_id: c.num_new_tokens for c in plan.chunks}
    assert sizes == {"short": 1, "long": 15}  # the decode is never starved by the long prefill
    plan = step(scheduler)
    assert {c.request.request_id: c.num_new_tokens for c in plan.chunks} == {"short": 1, "long": 15}
    plan = step(scheduler)
    assert {c.request.request_id: c.num_new_tokens for c in plan.chunks} == {"short": 1, "long": 10}
    assert plan.chunks[1].samples_token


def test_max_num_seqs_limits_running() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 2))
    step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["r0", "r1"]
    assert [r.request_id for r in scheduler.waiting] == ["r2"]


def test_finish_on_max_tokens_and_eos_frees_blocks() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3, max_tokens=2))
    scheduler.add_request(make_request("b", 3, max_tokens=8))
    step(scheduler)
    plan = scheduler.schedule()
    outputs = scheduler.update(plan, RunnerOutput({"a": 5, "b": EOS}, 0.0))
    reasons = {o.request_id: o.finish_reason for o in outputs}
    assert reasons == {"a": "length", "b": "stop"}
    assert scheduler.blocks.num_used_blocks == 0
    assert sorted(scheduler.schedule().released_request_ids) == ["a", "b"]


def test_preempts_most_recent_when_kv_runs_out_and_recomputes() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens of KV
    scheduler.add_request(make_request("old", 8, max_tokens=8))
    scheduler.add_request(make_request("new", 8, max_tokens=8))
    step(scheduler)  # both hold 2 blocks: memory is full
    plan = step(scheduler)  # `old` needs a third block: `new` (admitted last) is preempted
    assert plan.preempted_request_ids == ["new"]
    new = scheduler.waiting[0]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.output_token_ids == [7]  # kept: recomputed as part of its prompt on readmission
    while scheduler.running:
        step(scheduler)
    plan = step(scheduler)
    assert plan.chunks[0].request is new and plan.chunks[0].num_new_tokens == 9


def test_abort_waiting_and_running() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("run", 3))
    scheduler.add_request(make_request("wait", 3))
    step(scheduler)
    assert scheduler.abort_request("wait") is not None
    output = scheduler.abort_request("run")
    assert output is not None and output.finish_reason == "abort"
    assert not scheduler.has_work and scheduler.blocks.num_used_blocks == 0
    assert scheduler.abort_request("unknown") is None


def test_failed_step_ends_only_its_requests() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("in-step", 16))
    scheduler.add_request(make_request("not-in-step", 16))
    plan = scheduler.schedule()
    failed = {chunk.request.request_id: "boom" for chunk in plan.chunks}  # what a step that raised reports
    outputs = scheduler.update(plan, RunnerOutput(sampled_token_ids={}, forward_time_s=0.0, failed_request_ids=failed))
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("in-step", "error")]
    assert [r.request_id for r in scheduler.waiting] == ["not-in-step"]


def test_prefill_beside_decodes_is_chunked_to_keep_their_tpot() -> None:
    from mace.config import SloConfig
    from mace.engine.step_budget import MIN_PREFILL_CHUNK

    config = EngineConfig(max_num_batched_tokens=512, max_num_seqs=8)
    scheduler = Scheduler(config, BlockPool(1024, 16), clock=lambda: 0.0, slo=SloConfig(tpot_s=0.1))
    measure_steps(scheduler, (0, 16, 64, 128), chunk_s=0.0)
    stream_four_then_add(scheduler, "long", 400)
    chunk_sizes = []
    while scheduler.waiting or any(r.is_prefilling for r in scheduler.running):
        plan = step(scheduler)
        assert plan.num_decode_tokens == 4  # the streams advance every step
        assert scheduler.latency.predict(plan.shape) <= 0.1 + 1e-9
        chunk_sizes.append(plan.num_prefill_tokens)
    assert sum(chunk_sizes) == 400 and len(chunk_sizes) > 1 and min(chunk_sizes[:-1]) >= MIN_PREFILL_CHUNK
    # Alone, the same prompt goes in one step: the cap is there only for the streams' sake.
    alone = Scheduler(config, BlockPool(1024, 16), clock=lambda: 0.0, slo=SloConfig(tpot_s=0.1))
    alone.add_request(make_request("long", 400))
    assert step(alone).num_prefill_tokens == 400


def test_a_prompt_is_never_cut_finer_than_a_chunks_fixed_cost_is_worth() -> None:
    """When a chunk's own cost (50 ms) leaves no spare time beside the decodes, the prompt goes in
    pieces of at least 50 tokens (1 ms each), not in many tiny ones that each pay the 50 ms again."""
    from mace.config import SloConfig

    config = EngineConfig(max_num_batched_tokens=512, max_num_seqs=8, scheduling="fcfs")  # no decode cap here
    scheduler = Scheduler(config, BlockPool(1024, 16), clock=lambda: 0.0, slo=SloConfig(tpot_s=0.08))
    measure_steps(scheduler, (0, 8, 16, 64, 128), chunk_s=0.05)
    stream_four_then_add(scheduler, "long", 200)
    chunk_sizes = []
    while scheduler.waiting or any(r.is_prefilling for r in scheduler.running):
        chunk_sizes.append(step(scheduler).num_prefill_tokens)
    assert sum(chunk_sizes) == 200
    assert min(chunk_sizes[:-1]) >= 49 and len(chunk_sizes) <= 5


def measure_steps(scheduler: Scheduler, prefills: tuple[int, ...], chunk_s: float) -> None:
    """Feed the latency model steps costing 10 ms + 1 ms per prompt token + 5 ms per decode + `chunk_s` per chunk."""

    for prefill in prefills:
        for decode in range(0, 5):
            chunks = 1 if prefill else 0
            shape = StepShape(prefill, decode, num_prefill_chunks=chunks)
            scheduler.latency.observe(shape, 0.01 + 0.001 * prefill + 0.005 * decode + chunk_s * chunks)


def stream_four_then_add(scheduler: Scheduler, request_id: str, prompt_tokens: int) -> None:
    """Four short requests start streaming, then a long prompt arrives."""
    for i in range(4):
        scheduler.add_request(make_request(f"streaming-{i}", 4, max_tokens=100))
    step(scheduler)
    scheduler.add_request(make_request(request_id, prompt_tokens))
