"""The online latency model and its margin, with synthetic step times (no tensors)."""

from __future__ import annotations

import random

from mace.engine.latency import LatencyModel, StepShape, TpotGuard
from mace.engine.plan import RunnerOutput
from mace.engine.scheduler import Scheduler
from tests.engine.test_scheduler import make_request
from tests.train.test_policy import FakeSource, decoding_plan, make, teach_latency, train_seconds


def true_step_s(shape: StepShape) -> float:
    """A machine where any inference forward costs 80 ms whatever its batch, training only per token."""
    forward_s = 0.08 if shape.has_inference else 0.0
    return (0.002 + forward_s + 0.008 * shape.num_prefill_tokens + 0.015 * shape.num_decode_tokens
            + 0.0003 * shape.num_train_forward_tokens + 0.0004 * shape.num_train_backward_tokens
            + 0.05 * shape.num_prefill_chunks)


def test_each_prompt_chunk_has_a_fixed_cost_of_its_own() -> None:
    model = LatencyModel()
    for prefill, chunks in ((8, 1), (16, 1), (64, 1), (32, 2), (128, 2), (256, 1)) * 4:
        for decode in (0, 2):
            shape = StepShape(prefill, decode, num_prefill_chunks=chunks)
            model.observe(shape, true_step_s(shape))
    for shape in (StepShape(10, 1, num_prefill_chunks=1), StepShape(200, 0, num_prefill_chunks=1)):
        assert abs(model.predict(shape) - true_step_s(shape)) < 0.002


def test_an_inference_forwards_fixed_cost_is_not_charged_to_training_alone() -> None:
    model = LatencyModel()
    shapes = [StepShape(0, d, f, b) for d in (0, 1, 2, 4) for f in (0, 64, 256) for b in (0, 128)]
    for shape in shapes * 4:
        if shape != StepShape():
            model.observe(shape, true_step_s(shape))
    train_only = StepShape(0, 0, 256, 128)
    assert abs(model.predict(train_only) - true_step_s(train_only)) < 0.002
    assert abs(model.predict(StepShape(0, 3)) - true_step_s(StepShape(0, 3))) < 0.002
    # What training adds beside decodes is its own tokens' cost, not a second forward.
    assert abs(model.marginal_s(train_only) - (true_step_s(train_only) - 0.002)) < 0.002


def test_a_one_token_forward_and_a_batched_one_are_fitted_apart() -> None:
    # fp32 on a CPU: one token is a matrix-vector product per layer (95 ms), two or more a matrix
    # product (a 75 ms step more, then 5 ms per token), as SmolLM2 measures on 2 cores.
    def step_s(shape: StepShape) -> float:
        tokens = shape.num_prefill_tokens + shape.num_decode_tokens
        return 0.095 + (0.075 if tokens >= 2 else 0.0) + 0.005 * max(0, tokens - 1)

    model = LatencyModel()
    for decode in [*range(13, 0, -1), 1, 1, 1, 1]:
        model.observe(StepShape(0, decode), step_s(StepShape(0, decode)))
    for shape in (StepShape(0, 1), StepShape(0, 2), StepShape(0, 8), StepShape(0, 20)):
        assert abs(model.predict(shape) - step_s(shape)) < 0.003, shape
    assert model.coefficients()["batched_forward"] > 0.05


def test_noise_on_one_token_steps_does_not_make_a_batched_step() -> None:
    # bf16 with AMX: one decode costs what two do, and the steps are noisy. Kept non-negative, a fitted
    # step would come out positive from the noise alone and tax every batched step.
    rng = random.Random(3)
    fitted = []
    for _ in range(20):
        model = LatencyModel()
        for decode in [*range(16, 0, -1), 1, 1, 1] * 2:
            model.observe(StepShape(0, decode), 0.07 + 0.002 * decode + rng.gauss(0.0, 0.015))
        model.refit()
        fitted.append(model.coefficients()["batched_forward"])
    assert sum(step > 0 for step in fitted) <= 3, fitted  # unchecked, about half come out positive


def test_a_batched_step_is_in_the_forwards_cost_when_every_forward_was_batched() -> None:
    model = LatencyModel()
    shapes = [StepShape(0, d, f) for d in (0, 2, 4, 8) for f in (0, 64)]
    for shape in shapes * 3:
        if shape != StepShape():
            model.observe(shape, true_step_s(shape))
    assert model.coefficients()["batched_forward"] == 0.0
    assert abs(model.predict(StepShape(0, 3)) - true_step_s(StepShape(0, 3))) < 0.002
    assert model.is_measured(StepShape(0, 3))


def test_a_window_of_one_decode_per_step_keeps_the_per_decode_cost() -> None:
    # Fitted on batches of 1 to 12, then the machine slows and the decode cap falls to 1: a whole
    # window of one-decode steps (and the prompts between them) cannot tell a decode's cost from the
    # step's. The slowdown goes to the fixed cost; a second decode must not look like half a step.
    model = LatencyModel(window=64)
    for decode in range(12, 0, -1):
        model.observe(StepShape(0, decode), 0.07 + 0.003 * decode)
    model.refit()
    per_decode = model.coefficients()["decode_token"]
    assert abs(per_decode - 0.003) < 0.0005
    for step in range(64):
        shape = StepShape(0, 1) if step % 4 else StepShape(16 + step, 0, num_prefill_chunks=1)
        model.observe(shape, 0.13 + 0.001 * shape.num_prefill_tokens)
    assert model.coefficients()["decode_token"] <= per_decode
    assert abs(model.predict(StepShape(0, 1)) - 0.13) < 0.005
    assert model.predict(StepShape(0, 2)) < 0.14


def test_coefficients_stay_non_negative_on_noisy_data() -> None:
    rng = random.Random(0)
    model = LatencyModel()
    for _ in range(256):
        shape = StepShape(0, rng.randint(1, 4), rng.choice([0, 64]))
        model.observe(shape, max(0.0, true_step_s(shape) + rng.gauss(0.0, 0.05)))
    for shape in (StepShape(), StepShape(1), StepShape(0, 1), StepShape(0, 0, 1), StepShape(0, 0, 0, 1)):
        assert model.predict(shape) >= 0.0
        assert model.marginal_s(shape) >= 0.0


def test_the_margin_reads_the_noise_of_steps_that_serve_not_of_training_alone() -> None:
    rng = random.Random(1)
    model = LatencyModel()
    for step in range(512):
        if step % 3:  # two thirds are short, exact training-only steps
            shape = StepShape(0, 0, 64)
            model.observe(shape, true_step_s(shape))
        else:  # serving steps overrun by up to 60 ms
            shape = StepShape(0, 2)
            model.observe(shape, true_step_s(shape) + rng.uniform(0.0, 0.06))
    assert model.model_margin_s > 0.02


def test_guard_settles_where_about_one_request_in_a_hundred_misses() -> None:
    rng = random.Random(2)
    guard = TpotGuard(near_miss_fraction=0.0)
    target_s, missed = 0.35, 0
    for _ in range(20_000):  # a request's TPOT: what was planned under the margin, plus noise
        tpot_s = target_s - guard.extra_s + rng.gauss(0.0, 0.03)
        missed += tpot_s > target_s
        guard.observe(tpot_s, target_s)
    assert 0.005 < missed / 20_000 < 0.03
    assert 0.03 < guard.extra_s < 0.12  # near the noise's 99th percentile (0.07 s)


def test_guard_counts_a_request_just_under_its_target_as_a_miss() -> None:
    guard = TpotGuard(reference_s=0.35)
    guard.observe(0.34, 0.35)  # inside the target by the engine's clock, maybe not by the client's
    assert guard.num_missed == 1 and guard.extra_s > 0
    guard.observe(0.30, 0.35)
    assert guard.num_met == 1


def test_guard_never_takes_more_than_a_quarter_of_the_tightest_target() -> None:
    guard = TpotGuard(reference_s=0.1)
    for _ in range(100):
        guard.observe(1.0, 0.1)
    assert guard.extra_s <= 0.025 + 1e-12


def test_a_relaxed_classs_miss_moves_the_margin_by_the_tightest_targets_step() -> None:
    guard = TpotGuard(reference_s=0.35)
    guard.observe(3.0, 2.0)  # a batch request (TPOT target 2 s) missed
    assert guard.num_missed == 1
    assert abs(guard.extra_s - 0.035) < 1e-12


def test_a_request_that_missed_its_tpot_shrinks_later_steps_training() -> None:
    def taught(now: list[float]) -> Scheduler:
        scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.1)
        scheduler.clock = lambda: now[0]
        teach_latency(scheduler)
        return scheduler

    baseline = train_seconds(taught([0.0]), decoding_plan(taught([0.0]), 1))
    now = [1000.0]
    scheduler = taught(now)
    scheduler.add_request(make_request("slow", 4, max_tokens=4))
    while scheduler.running or scheduler.waiting:  # each token takes twice the 0.1 s target
        plan = scheduler.schedule()
        now[0] += 0.2
        scheduler.update(plan, RunnerOutput({c.request.request_id: 7 for c in plan.chunks if c.samples_token}, 0.0))
    assert scheduler.latency.guard.num_missed == 1
    assert train_seconds(scheduler, decoding_plan(scheduler, 1)) < baseline


def test_no_latency_bound_training_beside_inference_the_model_never_measured() -> None:
    scheduler = make("mace", FakeSource(drift=5.0), tpot_s=1.0)
    plan = decoding_plan(scheduler, 1)  # priors only
    assert plan.chunks and plan.train is None
    continuous = make("continuous", FakeSource(), tpot_s=1.0, chunk_tokens=8)
    assert decoding_plan(continuous, 1).train is not None  # a policy that ignores latency still trains


def test_a_request_behind_its_tpot_gets_a_shorter_step_until_its_mean_recovers() -> None:
    now = [1000.0]
    scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.1)
    scheduler.clock = lambda: now[0]
    teach_latency(scheduler)
    plan = decoding_plan(scheduler, 1)
    on_pace = train_seconds(scheduler, plan)
    request = scheduler.running[0]
    assert request.first_token_time_s is not None and on_pace > 0.05
    # Its first interval took 0.15 s (a slow step): the next may take at most 0.05 s for the mean
    # of the two to stay at the 0.1 s target.
    now[0] = request.first_token_time_s + 0.15
    scheduler.update(plan, RunnerOutput({request.request_id: 7}, 0.0))
    behind = scheduler.schedule()
    assert behind.train is not None and train_seconds(scheduler, behind) < on_pace
    assert scheduler.latency.predict(behind.shape) <= 0.05 + 1e-9


def test_a_run_of_slow_steps_raises_the_margin_until_the_machine_recovers() -> None:
    model = LatencyModel()
    shape = StepShape(0, 2)
    for _ in range(64):
        model.observe(shape, true_step_s(shape))
    settled_s = model.error_margin_s
    for _ in range(4):  # something else takes the cores: each step runs 80 ms over
        model.observe(shape, true_step_s(shape) + 0.08)
    assert model.error_margin_s > settled_s + 0.05
    assert model.mean_margin_s == 0.0  # the decode batch is not resized for a moment: no request missed
    for _ in range(20):
        model.observe(shape, true_step_s(shape))
    assert model.error_margin_s < settled_s + 0.005


def test_the_window_margin_leaves_out_the_overrun_that_the_steps_before_foresaw() -> None:
    model = LatencyModel()
    shape = StepShape(0, 2)
    for step in range(512):  # one step in five runs 60 ms over, in runs of ten
        model.observe(shape, true_step_s(shape) + (0.06 if step % 50 < 10 else 0.0))
    # Every slow step's whole overrun would be the 95th percentile; after the first of a run, the
    # running mean foresees most of it.
    assert model.model_margin_s < 0.045
    assert model.model_tail_margin_s >= model.model_margin_s > 0.0
