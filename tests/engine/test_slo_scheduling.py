"""SLO-aware queueing with a fake clock and no model: earliest deadline first, no starvation, FCFS."""

from __future__ import annotations

import pytest

from mace.config import EngineConfig, SloConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.latency import StepShape
from mace.engine.request import Request, SamplingParams
from mace.engine.scheduler import Scheduler
from tests.engine.test_scheduler import step

TARGETS = {name: (SloConfig().target(name).ttft_s, SloConfig().target(name).tpot_s)
           for name in ("interactive", "batch")}
INTERACTIVE_TPOT_S = TARGETS["interactive"][1]


def request(request_id: str, slo_class: str, arrival_s: float, num_prompt: int = 8, max_tokens: int = 2) -> Request:
    ttft_s, tpot_s = TARGETS[slo_class]
    return Request(request_id=request_id, prompt_token_ids=list(range(1, num_prompt + 1)),
                   sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0), eos_token_ids=frozenset(),
                   max_model_len=4096, arrival_time_s=arrival_s, slo_class=slo_class, ttft_s=ttft_s, tpot_s=tpot_s)


def scheduler(scheduling: str = "slo", max_num_seqs: int = 1) -> Scheduler:
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, scheduling=scheduling)  # type: ignore[arg-type]
    return Scheduler(config, BlockPool(512, 16), clock=lambda: 0.0, slo=SloConfig())


def admission_order(s: Scheduler) -> list[str]:
    order: list[str] = []
    while s.waiting or s.running:
        plan = step(s)
        order += [c.request.request_id for c in plan.chunks if c.start_position == 0]
    return order


def test_earliest_deadline_first_puts_interactive_ahead_of_earlier_batch() -> None:
    s = scheduler()
    s.add_request(request("batch-early", "batch", arrival_s=0.0))
    s.add_request(request("interactive-late", "interactive", arrival_s=5.0))
    assert admission_order(s) == ["interactive-late", "batch-early"]


def test_first_come_first_served_keeps_arrival_order() -> None:
    s = scheduler("fcfs")
    s.add_request(request("batch-early", "batch", arrival_s=0.0))
    s.add_request(request("interactive-late", "interactive", arrival_s=5.0))
    assert admission_order(s) == ["batch-early", "interactive-late"]


def test_a_relaxed_request_ages_ahead_of_newer_interactive_ones() -> None:
    s = scheduler()
    s.add_request(request("batch", "batch", arrival_s=0.0))  # deadline 30 s
    for i in range(40):  # a steady stream of interactive arrivals, one a second
        s.add_request(request(f"i{i}", "interactive", arrival_s=float(i)))
    order = admission_order(s)
    position = order.index("batch")
    assert order[:position] == [f"i{i}" for i in range(position)]
    assert position < 40  # admitted before the interactive requests that arrived after its deadline
    assert all(int(name[1:]) >= 29 for name in order[position + 1 :])


def test_predicted_ttft_grows_with_the_queue_ahead_and_ignores_later_deadlines() -> None:
    s = scheduler(max_num_seqs=8)
    for prefill in (0, 16, 64):
        for decode in range(4):
            s.latency.observe(StepShape(prefill, decode), 0.01 + 0.001 * prefill + 0.005 * decode)
    empty = s.predict_ttft_s(100, ttft_s=1.0, now_s=0.0)
    for i in range(10):
        s.add_request(request(f"i{i}", "interactive", arrival_s=0.0, num_prompt=100))
    queued = s.predict_ttft_s(100, ttft_s=1.0, now_s=0.0)
    assert queued > 5 * empty
    # A batch request would be queued behind them; an interactive one arriving long before their
    # deadlines would not.
    assert s.predict_ttft_s(100, ttft_s=30.0, now_s=0.0) == queued
    assert s.predict_ttft_s(100, ttft_s=0.01, now_s=-5.0) == empty


def _teach_decode_cost(s: Scheduler, base_s: float, per_token_s: float) -> None:
    for n in range(1, 33):
        s.latency.observe(StepShape(num_decode_tokens=n), base_s + per_token_s * n)


def test_slo_scheduling_caps_the_batch_at_the_tightest_tpot() -> None:
    """Relaxed requests alone never grow the batch past what an interactive request could join."""
    slo_scheduler, fcfs_scheduler = scheduler(max_num_seqs=32), scheduler("fcfs", max_num_seqs=32)
    for s in (slo_scheduler, fcfs_scheduler):
        _teach_decode_cost(s, 0.015, 0.01)  # the interactive TPOT holds 18 decodes at 0.2 s
        for i in range(30):
            s.add_request(request(f"b{i}", "batch", arrival_s=0.0, max_tokens=100))
        for _ in range(8):  # 64 prompt tokens a step: all 30 would be in after 4
            step(s)
    cap = slo_scheduler.decode_cap()
    assert slo_scheduler.latency.predict(StepShape(num_decode_tokens=cap)) <= INTERACTIVE_TPOT_S
    assert slo_scheduler.latency.predict(StepShape(num_decode_tokens=cap + 1)) > INTERACTIVE_TPOT_S
    assert len(slo_scheduler.running) == cap < 30
    assert len(fcfs_scheduler.running) == 30


def test_a_full_batch_adds_the_wait_for_a_slot_to_the_predicted_ttft() -> None:
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, 0.01, 0.02)
    empty = s.predict_ttft_s(8, 1.0, now_s=0.0)
    for i in range(30):
        s.add_request(request(f"b{i}", "batch", arrival_s=0.0, max_tokens=100))
    for _ in range(8):
        step(s)
    # at least one decode wave of the running batch
    assert s.predict_ttft_s(8, 1.0, now_s=0.0) > empty + INTERACTIVE_TPOT_S


def test_an_interactive_arrival_takes_a_relaxed_requests_slot_at_the_cap() -> None:
    s = scheduler(max_num_seqs=2)
    s.add_request(request("b0", "batch", arrival_s=0.0, max_tokens=100))
    s.add_request(request("b1", "batch", arrival_s=0.1, max_tokens=100))
    step(s)
    step(s)
    s.add_request(request("i0", "interactive", arrival_s=1.0, max_tokens=100))
    plan = step(s)
    assert plan.preempted_request_ids == ["b1"]  # the loosest deadline gives way
    assert {r.request_id for r in s.running} == {"b0", "i0"}
    assert [r.request_id for r in s.waiting] == ["b1"]  # and waits to be recomputed


def test_a_request_past_its_deadline_keeps_its_slot() -> None:
    s = scheduler(max_num_seqs=1)
    s.add_request(request("b0", "batch", arrival_s=0.0, max_tokens=100))
    step(s)
    s.add_request(request("i0", "interactive", arrival_s=40.0, max_tokens=100))  # b0's deadline (30 s) is earlier
    plan = step(s)
    assert plan.preempted_request_ids == []
    assert [r.request_id for r in s.running] == ["b0"]


def test_predicted_ttft_counts_relaxed_requests_that_have_no_yields_left() -> None:
    """A batch request keeps its place once it has given it up MAX_YIELDS times: an interactive
    arrival then waits for it, and the prediction (the shed decision) must say so."""
    from mace.engine.decode_cap import MAX_YIELDS

    s = scheduler(max_num_seqs=1)
    _teach_decode_cost(s, 0.01, 0.02)
    s.add_request(request("b0", "batch", arrival_s=0.0, max_tokens=100))
    step(s)
    yielding = s.predict_ttft_s(8, 1.0, now_s=0.0)
    s.running[0].num_preemptions = MAX_YIELDS
    assert s.predict_ttft_s(8, 1.0, now_s=0.0) > yielding + 1.0  # ~99 decode steps of b0 first


def test_the_cap_leaves_room_for_a_prompt_chunk_once_prefill_is_measured() -> None:
    """Under load a prompt is prefilled beside the decodes in most steps: the capped batch plus the
    smallest chunk must still fit the tightest TPOT, or every arrival makes every stream miss."""
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, 0.015, 0.02)
    alone = s.decode_cap()
    for decode in range(0, 9):
        for prefill in (16, 32, 64):
            s.latency.observe(StepShape(prefill, decode, num_prefill_chunks=1), 0.015 + 0.02 * decode + 0.001 * prefill)
    s.latency.refit()
    cap = s.decode_cap()
    assert cap < alone
    chunk = StepShape(16, cap, num_prefill_chunks=1)
    assert s.latency.predict(chunk) + s.latency.error_margin_s <= INTERACTIVE_TPOT_S + 1e-9


def test_noisy_steps_do_not_shrink_the_batch_but_missed_requests_do() -> None:
    """A request's TPOT is the mean of its steps: one step's noise averages out over its answer, so the
    cap follows the mean step time and the outcomes of finished requests, not the window's tail."""
    steady, noisy = scheduler(max_num_seqs=32), scheduler(max_num_seqs=32)
    _teach_decode_cost(steady, 0.015, 0.01)
    for decode in range(1, 9):
        for jitter in (-0.04, 0.04) * 4:  # the same mean, every step 40 ms off
            noisy.latency.observe(StepShape(0, decode), 0.015 + 0.01 * decode + jitter)
    noisy.latency.refit()
    assert noisy.latency.error_margin_s > 0.03  # training's per-step slack still keeps the tail free
    assert noisy.decode_cap() == steady.decode_cap()
    for _ in range(4):  # requests with no training beside them, slower than the model's steps said
        noisy.latency.request_bias.observe(tpot_s=INTERACTIVE_TPOT_S, predicted_step_s=0.5 * INTERACTIVE_TPOT_S)
    assert noisy.decode_cap() < steady.decode_cap()


def test_misses_beside_training_shrink_training_and_only_misses_without_it_shrink_the_batch() -> None:
    """Training takes the slack up to the TPOT target, so answers beside it land near it and some miss:
    those are undone by training giving time back (the guard is in training's margin), not by a smaller
    batch. Misses of requests that shared no step with training say the batch itself is too slow."""
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, 0.015, 0.01)
    cap = s.decode_cap()
    now = [0.0]
    s.clock = lambda: now[0]

    def finish(with_training: bool) -> None:
        finished = request(f"r{now[0]}", "interactive", now[0], max_tokens=11)
        finished.first_token_time_s = now[0]
        finished.output_token_ids = [1] * 11
        finished.num_steps_with_training = 5 if with_training else 0
        finished.predicted_decode_s_total = 10 * INTERACTIVE_TPOT_S  # the model put its steps at the target
        now[0] += 10 * 1.5 * INTERACTIVE_TPOT_S  # a mean gap 1.5x the target: a miss
        s._observe_tpot(finished)

    margin = s.latency.error_margin_s
    for _ in range(4):
        finish(with_training=True)
    assert s.latency.error_margin_s > margin  # training's budget shrinks
    assert s.decode_cap() == cap
    for _ in range(4):
        finish(with_training=False)
    assert s.decode_cap() < cap


def test_misses_the_model_foresaw_do_not_shrink_the_batch() -> None:
    """Where one stream's step is already near the TPOT target (a slow CPU), requests miss at any
    batch size. If those misses shrank the batch, the cap would fall to one request and the rest
    would queue for seconds and be refused; steps that took what the model said keep the cap."""
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, 0.9475 * INTERACTIVE_TPOT_S, 0.001)  # one decode 95% of the target, each more +1 ms
    cap = s.decode_cap()
    assert cap > 4
    now = [0.0]
    s.clock = lambda: now[0]
    for index in range(16):  # served one at a time, each step as slow as predicted: all (nearly) miss
        finished = request(f"r{index}", "interactive", now[0], max_tokens=11)
        finished.first_token_time_s = now[0]
        finished.output_token_ids = [1] * 11
        step_s = s.latency.predict(StepShape(num_decode_tokens=1))
        finished.predicted_decode_s_total = 10 * step_s
        now[0] += 10 * step_s
        s._observe_tpot(finished)
    guard = s.latency.guard
    assert step_s > INTERACTIVE_TPOT_S * (1 - guard.near_miss_fraction)  # each a miss by the guard's measure
    assert s.decode_cap() == cap


def test_the_cap_counts_a_prompt_chunk_by_the_share_of_steps_that_carry_one() -> None:
    """A request's TPOT is the mean of its steps: with rare arrivals few of them carry a prompt chunk,
    and a chunk counted in every step would shrink the batch for a cost its requests rarely pay."""
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, 0.015, 0.01)
    for decode in range(0, 9):
        for prefill in (16, 32, 64):
            s.latency.observe(StepShape(prefill, decode, num_prefill_chunks=1), 0.015 + 0.01 * decode + 0.002 * prefill)
    s.latency.refit()
    busy = s.decode_cap()  # the share starts at one: a chunk in every step
    s.prompt_chunk_share = 0.05
    assert s.decode_cap() > busy


def test_the_cap_gives_its_margin_up_before_a_waiting_request_misses_its_first_token() -> None:
    """The margins keep streams inside their TPOT, but a request queued past its TTFT (or refused)
    loses more: while the first waiting request would wait for a place past its deadline, the cap
    grows to what the model alone puts within the TPOT target."""
    s = scheduler(max_num_seqs=32)
    now = [0.0]
    s.clock = lambda: now[0]
    _teach_decode_cost(s, 0.015, 0.01)
    for _ in range(4):  # streams ran slower than the model said: a margin, a smaller cap
        s.latency.request_bias.observe(tpot_s=0.1, predicted_step_s=0.05)
    soft, hard = s._decode_caps()
    assert soft < hard
    for i in range(soft):  # long answers hold every place of the margin's cap
        s.add_request(request(f"long{i}", "interactive", arrival_s=0.0, max_tokens=500))
    for _ in range(8):
        step(s)
    assert len(s.running) == soft and not s.waiting
    assert s.decode_cap() == soft  # nobody waits: the margin holds
    arrival = request("late", "interactive", arrival_s=now[0])
    predicted_s = s.predict_ttft_s(arrival.num_prompt_tokens, arrival.ttft_s, now[0])
    assert predicted_s <= arrival.ttft_s  # admitted: a place opens under the grown cap
    s.add_request(arrival)
    assert s.decode_cap() == hard
    step(s)
    assert arrival in s.running


def test_steps_teach_the_chunk_share_and_each_request_its_predicted_steps() -> None:
    """The share of decoding steps with a prompt chunk follows the steps run, and a request adds up
    the model's prediction of every step between two of its tokens (what `RequestBias` compares)."""
    s = scheduler(max_num_seqs=8)
    _teach_decode_cost(s, 0.015, 0.01)
    s.add_request(request("long", "interactive", arrival_s=0.0, max_tokens=50))
    step(s)  # the prompt, and the first token
    running = s.running[0]
    assert running.predicted_decode_s_total == 0.0
    for _ in range(40):  # decodes alone
        step(s)
    assert s.prompt_chunk_share < 0.2
    assert running.predicted_decode_s_total == pytest.approx(40 * s.latency.predict(StepShape(num_decode_tokens=1)))
    s.add_request(request("arrival", "interactive", arrival_s=0.0))
    share = s.prompt_chunk_share
    step(s)  # its prompt rides beside the decode
    assert s.prompt_chunk_share > share


@pytest.mark.parametrize(("per_token_s", "expected"), [(0.0001, 32), (0.02, 1)], ids=["gpu-like", "cpu-like"])
def test_a_target_no_batch_meets_caps_only_where_a_smaller_batch_is_faster(per_token_s: float,
                                                                          expected: int) -> None:
    """With the interactive TPOT target below even one request's step, shrinking the batch buys its
    streams nothing where a step of 32 costs about what a step of 1 does (a GPU decoding a small
    model): the cap then keeps them all running instead of queueing 31. Where each request adds real
    cost (a CPU), the cap still falls to one."""
    s = scheduler(max_num_seqs=32)
    _teach_decode_cost(s, INTERACTIVE_TPOT_S * 1.2, per_token_s)
    s.latency.refit()
    assert s.latency.predict(StepShape(num_decode_tokens=1)) > INTERACTIVE_TPOT_S
    assert s.decode_cap() == expected
