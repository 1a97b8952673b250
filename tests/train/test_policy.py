"""Retraining policies inside the scheduler, with a fake clock and a fake train source (no tensors)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mace.config import EngineConfig, SloConfig, TrainConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.latency import StepShape
from mace.engine.plan import IterationPlan, RunnerOutput, shape_of
from mace.engine.scheduler import Scheduler
from mace.engine.train_planner import EASE_IN_STEPS, StepLimits
from mace.train.layered import MAX_PASS_TOKENS
from mace.train.policy import make_policy
from mace.train.work import StageKind, TrainStage, TrainWork
from tests.engine.test_scheduler import make_request

NUM_LAYERS = 4
SAMPLE_TOKENS = 8
MICRO_STEP = [
    *[TrainStage(StageKind.FORWARD, SAMPLE_TOKENS)] * NUM_LAYERS,
    TrainStage(StageKind.HEAD, 4),
    *[TrainStage(StageKind.BACKWARD, SAMPLE_TOKENS)] * NUM_LAYERS,
]


@dataclass
class FakeSource:
    drift: float = 1.0
    num_samples_read: int = 0
    upkeep: list[TrainStage] = field(default_factory=list)

    converged: bool = False
    pass_sizes: list[int] = field(default_factory=list)  # max_pass_tokens of every job_stages call

    @property
    def num_trainable(self) -> int:
        return 100

    @property
    def is_converged(self) -> bool:
        return self.converged

    def drift_ratio(self) -> float:
        return self.drift

    def upkeep_stages(self) -> list[TrainStage]:
        return list(self.upkeep)

    def job_stages(self, max_job_tokens: int, max_pass_tokens: int = 256) -> list[TrainStage]:
        self.pass_sizes.append(max_pass_tokens)
        return MICRO_STEP * max(1, max_job_tokens // SAMPLE_TOKENS)


def make(policy: str, source: FakeSource, tpot_s: float = 0.1, **train: object) -> Scheduler:
    config = TrainConfig(policy=policy, **train)  # type: ignore[arg-type]
    return Scheduler(EngineConfig(max_num_batched_tokens=64), BlockPool(256, 16), clock=lambda: 1000.0,
                     slo=SloConfig(tpot_s=tpot_s), policy=make_policy(config), train_source=source)


def teach_latency(scheduler: Scheduler) -> None:
    """Make the latency model know: 10 ms base, 2 ms per decode token, 0.5 ms per layer-token of
    training forward, 1 ms of backward, 5 ms per head token."""
    for decode in range(1, 9):
        for forward, backward, head in ((0, 0, 0), (8, 0, 0), (16, 8, 4), (0, 24, 0), (8, 8, 8)):
            shape = StepShape(0, decode, forward, backward, head)
            scheduler.latency.observe(shape, 0.01 + 0.002 * decode + 0.0005 * forward + 0.001 * backward
                                      + 0.005 * head)


def decoding_plan(scheduler: Scheduler, num_running: int) -> IterationPlan:
    for i in range(num_running):
        scheduler.add_request(make_request(f"r{i}-{id(scheduler)}", 4, max_tokens=100))
    plan = scheduler.schedule()
    scheduler.update(plan, RunnerOutput({c.request.request_id: 7 for c in plan.chunks if c.samples_token}, 0.0))
    return scheduler.schedule()  # all decoding now


def train_seconds(scheduler: Scheduler, plan: IterationPlan) -> float:
    """The predicted cost of the plan's training part."""
    inference = IterationPlan(chunks=plan.chunks).shape
    return scheduler.latency.predict(plan.shape) - scheduler.latency.predict(inference)


def test_mace_training_never_pushes_predicted_step_past_tpot() -> None:
    for num_running in (1, 4, 8):
        scheduler = make("mace", FakeSource(drift=5.0))
        teach_latency(scheduler)
        plan = decoding_plan(scheduler, num_running)
        assert plan.train is not None and plan.chunks
        assert scheduler.latency.predict(plan.shape) <= scheduler.slo.tpot_s + 1e-9
        # Layer stages let training use the slack even where a whole micro-step (~0.1 s) would not fit.
        assert train_seconds(scheduler, plan) > 0.5 * (scheduler.slo.tpot_s - scheduler.latency.predict(
            IterationPlan(chunks=plan.chunks).shape)) - 0.005


def test_training_gives_way_to_a_request_about_to_miss_its_first_token() -> None:
    """A prompt still prefilling with its TTFT deadline near: training takes less than beside a fresh one."""
    budgets = []
    for waited_s in (0.0, 0.9):
        scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.3)
        teach_latency(scheduler)
        for prefill in (8, 16, 32) * 3:  # and prefill: 1 ms a token
            for decode in (1, 2):
                scheduler.latency.observe(StepShape(prefill, decode, num_prefill_chunks=1),
                                          0.01 + 0.001 * prefill + 0.002 * decode)
        plan = decoding_plan(scheduler, 1)
        late = make_request(f"late-{waited_s}", 40, max_tokens=4)
        late.arrival_time_s, late.ttft_s = scheduler.clock() - waited_s, 1.0
        scheduler.add_request(late)
        plan = scheduler.schedule()
        assert any(chunk.request is late for chunk in plan.chunks)
        budgets.append(train_seconds(scheduler, plan))
    assert budgets[0] > 0.0
    assert budgets[1] < budgets[0]


def test_mace_trains_more_when_drift_rises_and_nearly_nothing_when_flat() -> None:
    budgets = []
    for drift in (1.0, 1.1, 1.3, 2.0):
        scheduler = make("mace", FakeSource(drift=drift), tpot_s=0.3)
        teach_latency(scheduler)
        budgets.append(train_seconds(scheduler, decoding_plan(scheduler, 2)))
    assert budgets[0] == 0
    assert budgets == sorted(budgets) and budgets[-1] > budgets[1]


SCORE_PASS = [*[TrainStage(StageKind.FORWARD, SAMPLE_TOKENS, is_upkeep=True)] * NUM_LAYERS,
              TrainStage(StageKind.HEAD, 4, is_upkeep=True)]


def test_scoring_new_samples_uses_the_slack_even_when_aligned() -> None:
    upkeep = SCORE_PASS * 3
    scheduler = make("mace", FakeSource(drift=1.0, upkeep=upkeep), tpot_s=0.3)
    teach_latency(scheduler)
    plan = decoding_plan(scheduler, 2)
    assert plan.train is not None
    assert list(plan.train.stages) == upkeep  # scored, but no training


def test_upkeep_is_cut_to_the_slack_layer_by_layer() -> None:
    """A long backlog of scoring takes what fits this step (some layers of it), not all or nothing."""
    upkeep = SCORE_PASS * 50
    scheduler = make("mace", FakeSource(drift=1.0, upkeep=upkeep), tpot_s=0.05)
    teach_latency(scheduler)
    plan = decoding_plan(scheduler, 2)
    assert plan.train is not None and 0 < len(plan.train.stages) < len(upkeep)
    assert scheduler.latency.predict(plan.shape) <= 0.05


def test_upkeep_runs_before_training_stages() -> None:
    upkeep = SCORE_PASS
    scheduler = make("continuous", FakeSource(upkeep=upkeep), chunk_tokens=8)
    plan = decoding_plan(scheduler, 1)
    assert plan.train is not None
    assert list(plan.train.stages) == [*upkeep, *MICRO_STEP]


def test_continuous_runs_a_whole_micro_step_whatever_the_drift() -> None:
    for drift in (1.0, 3.0):
        scheduler = make("continuous", FakeSource(drift=drift), chunk_tokens=16)
        teach_latency(scheduler)
        plan = decoding_plan(scheduler, 2)
        assert plan.train is not None and list(plan.train.stages) == MICRO_STEP * 2


def test_periodic_stops_serving_while_it_trains() -> None:
    source = FakeSource(num_samples_read=50)
    scheduler = make("periodic", source, periodic_min_samples=10, periodic_steps=2)
    scheduler.add_request(make_request("served", 4, max_tokens=100))
    plan = scheduler.schedule()
    assert plan.train is not None and plan.chunks == []  # the round started: no inference this step
    assert scheduler.training is not None
    scheduler.training.policy.on_optimizer_step(0.0)  # what the trainer tells its policy
    scheduler.training.policy.on_optimizer_step(0.0)
    # No sample since the round began: no new round, whatever the gate did with it.
    plan = scheduler.schedule()
    assert plan.train is None and [c.request.request_id for c in plan.chunks] == ["served"]
    source.num_samples_read = 60  # ten more samples: the next round
    assert scheduler.schedule().chunks == []


def test_none_never_trains() -> None:
    scheduler = make("none", FakeSource(drift=10.0))
    assert decoding_plan(scheduler, 1).train is None


def test_mace_idle_steps_stay_short_enough_for_a_new_arrival() -> None:
    scheduler = make("mace", FakeSource(drift=5.0), idle_chunk_tokens=512)
    teach_latency(scheduler)
    plan = scheduler.schedule()  # nothing to serve: training takes the step, but a bounded one
    assert plan.train is not None and not plan.chunks
    assert scheduler.latency.predict(plan.shape) <= 0.5 * scheduler.slo.ttft_s + scheduler.latency.predict(StepShape())


def test_idle_step_always_makes_progress_on_a_cautious_estimate() -> None:
    scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.1)
    for _ in range(16):  # a machine so slow that even one stage passes the idle bound
        scheduler.latency.observe(StepShape(0, 0, 8, 0, 0), 10.0)
    plan = scheduler.schedule()
    assert plan.train is not None and len(plan.train.stages) == 1


def test_a_stage_kind_never_measured_is_probed_now_and_then() -> None:
    from mace.engine.train_planner import PROBE_EVERY_STEPS

    huge = [TrainStage(StageKind.FORWARD, 100_000)]  # the prior prices it far past any slack

    class HugeSource(FakeSource):
        def job_stages(self, max_job_tokens: int, max_pass_tokens: int = 256) -> list[TrainStage]:
            return huge * 4

    scheduler = make("mace", HugeSource(drift=5.0), tpot_s=0.3)
    for decode in range(1, 9):  # inference is known; training never ran
        for _ in range(2):
            scheduler.latency.observe(StepShape(0, decode), 0.01 + 0.002 * decode)
    plans = [decoding_plan(scheduler, 2)]
    for _ in range(2 * PROBE_EVERY_STEPS):
        plan = scheduler.schedule()
        scheduler.update(plan, RunnerOutput({c.request.request_id: 7 for c in plan.chunks}, 0.0))
        plans.append(plan)
    probes = [plan for plan in plans if plan.train is not None]
    assert 1 <= len(probes) <= 3 and all(len(p.train.stages) == 1 for p in probes if p.train)
    assert all(plan.chunks for plan in plans)  # serving went on in every step


def test_training_keeps_the_latency_models_error_free_under_the_target() -> None:
    """Steps that overrun their prediction now and then shrink the slack training may take."""
    budgets = []
    for noise_s in (0.0, 0.01):
        scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.1)
        teach_latency(scheduler)
        for step in range(64):  # every other step runs `noise_s` slower than the model says
            shape = StepShape(0, 2, 8, 0, 0)
            scheduler.latency.observe(shape, scheduler.latency.predict(shape) + noise_s * (step % 2))
        plan = decoding_plan(scheduler, 2)
        budgets.append(train_seconds(scheduler, plan))
        assert scheduler.latency.predict(plan.shape) + scheduler.latency.error_margin_s <= 0.1
    assert scheduler.latency.error_margin_s > 0.005
    assert budgets[1] < budgets[0]


def test_idle_slack_leaves_the_error_margin_but_never_stops_training() -> None:
    from mace.train.policy import TrainContext

    def idle(margin_s: float) -> float:
        return TrainContext(now_s=0.0, has_inference=False, predicted_inference_s=0.0, tpot_s=0.3, ttft_s=1.0,
                            num_trainable=1, num_samples_read=0, drift=2.0, margin_s=margin_s).slack_s

    assert idle(0.0) == 0.5
    assert idle(0.2) < idle(0.0)
    assert idle(5.0) > 0


def test_training_eases_in_beside_inference_after_warm_up() -> None:
    scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.3)
    teach_latency(scheduler)
    planner = scheduler.training
    assert planner is not None
    serving, limits = StepShape(0, 2), StepLimits(tpot_s=0.3, ttft_slack_s=math.inf)

    def planned_train_s(inference: StepShape) -> float:
        work = planner.plan(inference, limits).work
        return scheduler.latency.marginal_s(shape_of(0, 0, work)) if work is not None else 0.0

    full = planned_train_s(serving)
    planner.ease_in()
    idle = planned_train_s(StepShape())  # with nothing to serve, nothing to protect: no easing
    first = planned_train_s(serving)
    later = [planned_train_s(serving) for _ in range(EASE_IN_STEPS)]
    assert idle >= full > 0
    assert 0 < first <= 0.5 * full
    assert later == sorted(later) and later[-1] == full


def test_upkeep_eases_in_too() -> None:
    """Scoring the first samples may take the whole slack: after warm-up it takes a share of it first."""
    taken = []
    for ease_in in (False, True):
        scheduler = make("mace", FakeSource(drift=1.0, upkeep=SCORE_PASS * 20), tpot_s=0.3)
        teach_latency(scheduler)
        planner = scheduler.training
        assert planner is not None
        if ease_in:
            planner.ease_in()
        work = planner.plan(StepShape(0, 2), StepLimits(tpot_s=0.3, ttft_slack_s=math.inf)).work
        assert work is not None and all(stage.is_upkeep for stage in work.stages)
        taken.append(len(work.stages))
    assert 0 < taken[1] <= 0.5 * taken[0]


def test_a_stage_that_fits_only_the_whole_slack_runs_once_easing_in_is_over() -> None:
    """Easing in counts the steps that had training waiting, not only those that ran some: a stage too
    big for the first share of the slack must not wait at that share for as long as anyone is served."""
    big = TrainStage(StageKind.HEAD, 30, is_upkeep=True)  # 0.15 s: over a quarter of the slack, under all of it
    scheduler = make("mace", FakeSource(drift=1.0, upkeep=[big]), tpot_s=0.3)
    teach_latency(scheduler)
    planner = scheduler.training
    assert planner is not None
    serving, limits = StepShape(0, 2), StepLimits(tpot_s=0.3, ttft_slack_s=math.inf)
    assert planner.plan(serving, limits).work is not None  # the whole slack holds it
    planner.ease_in()
    ran = [planner.plan(serving, limits).work is not None for _ in range(EASE_IN_STEPS + 1)]
    assert not ran[0]
    assert ran[-1]


def test_a_training_stage_bigger_than_one_steps_budget_runs_once_the_budget_adds_up() -> None:
    """At a low drift the policy gives training a small share of each step's slack; a stage bigger than
    that share (a head part) runs once the unspent shares of the steps it waited add up to it."""
    head = TrainStage(StageKind.HEAD, 20)  # 0.1 s
    source = FakeSource(drift=1.1)  # a fifth of the slack: about 0.055 s a step

    def job_stages(max_job_tokens: int, max_pass_tokens: int = 256) -> list[TrainStage]:
        return [head, *[TrainStage(StageKind.BACKWARD, SAMPLE_TOKENS)] * NUM_LAYERS]

    source.job_stages = job_stages  # type: ignore[method-assign]
    scheduler = make("mace", source, tpot_s=0.3)
    teach_latency(scheduler)
    planner = scheduler.training
    assert planner is not None
    serving, limits = StepShape(0, 8), StepLimits(tpot_s=0.3, ttft_slack_s=math.inf)
    context = planner._context(serving, limits)
    budget_s = planner.policy.decide(context).budget_s
    assert 0 < budget_s < scheduler.latency.marginal_s(shape_of(0, 0, TrainWork((head,))))
    ran = []
    for _ in range(4):
        work = planner.plan(serving, limits).work
        ran.append(work is not None and head in work.stages)
        if work is not None:
            cost_s = scheduler.latency.marginal_s(shape_of(0, 0, work))
            assert cost_s <= context.slack_s + context.beside_s  # never past the step's slack
    assert not ran[0] and any(ran)


def test_a_requests_only_gap_keeps_the_tail_margin_free_and_a_long_stream_the_usual_one() -> None:
    now = [1000.0]
    scheduler = make("mace", FakeSource(drift=5.0), tpot_s=0.1)
    scheduler.clock = lambda: now[0]
    teach_latency(scheduler)
    scheduler.latency.model_margin_s, scheduler.latency.model_tail_margin_s = 0.01, 0.04
    plan = decoding_plan(scheduler, 1)  # one token out: the next gap is all its TPOT rests on so far
    request = scheduler.running[0]
    assert plan.train is not None
    assert scheduler.latency.predict(plan.shape) <= 0.1 - 0.04 + 1e-9
    young_s = train_seconds(scheduler, plan)
    for _ in range(10):  # on pace: each token 90 ms
        now[0] += 0.09
        scheduler.update(plan, RunnerOutput({request.request_id: 7}, 0.0))
        plan = scheduler.schedule()
    assert request.num_output_tokens == 11 and plan.train is not None
    assert scheduler.latency.predict(plan.shape) <= 0.1 - 0.01 - 0.03 / 11 + 1e-9
    assert train_seconds(scheduler, plan) > young_s


def test_mace_rests_once_the_learner_fits_every_sample_whatever_the_drift() -> None:
    for converged, policy in ((False, "mace"), (True, "mace"), (True, "continuous")):
        scheduler = make(policy, FakeSource(drift=5.0, converged=converged), tpot_s=0.3)
        teach_latency(scheduler)
        budget = train_seconds(scheduler, decoding_plan(scheduler, 2))
        idle = scheduler.training is not None and scheduler.training.has_work(StepLimits(math.inf, math.inf))
        # continuous is the baseline that trains every iteration whatever it has learned
        assert (budget > 0 and idle) == (not converged or policy == "continuous"), (policy, converged)


def test_a_busy_steps_micro_step_gets_passes_its_training_budget_holds() -> None:
    """Samples together run faster per token, but one backward stage of the pass must fit a busy step's
    slack; with nothing to serve the pass is as large as it goes."""
    busy_source = FakeSource(drift=5.0)
    scheduler = make("mace", busy_source)
    teach_latency(scheduler)
    plan = decoding_plan(scheduler, 4)
    assert plan.train is not None
    # 0.1 s target, 18 ms predicted inference: at most ~82 ms of budget at 1 ms per backward layer-token.
    assert 1 <= busy_source.pass_sizes[-1] <= 82
    idle_source = FakeSource(drift=5.0)
    idle = make("continuous", idle_source)
    teach_latency(idle)
    assert idle.schedule().train is not None
    assert idle_source.pass_sizes[-1] == MAX_PASS_TOKENS
