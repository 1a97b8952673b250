"""Retraining policies inside the scheduler, with a fake clock and a fake train source (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mace.config import EngineConfig, SloConfig, TrainConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.latency import StepShape
from mace.engine.plan import RunnerOutput
from mace.engine.scheduler import Scheduler
from mace.train.policy import make_policy
from mace.train.replay import TrainChunk, TrainSample
from tests.engine.test_scheduler import make_request


@dataclass
class FakeSource:
    drift: float = 1.0
    num_new_samples: int = 0
    sample_tokens: int = 8
    samples: list[TrainSample] = field(default_factory=list)

    @property
    def num_trainable(self) -> int:
        return 100

    def drift_ratio(self) -> float:
        return self.drift

    def pick(self, max_tokens: int, at_least_one: bool = False) -> TrainChunk | None:
        count = max(min(4, max_tokens // self.sample_tokens), int(at_least_one))
        sample = TrainSample(1, [1] * self.sample_tokens, 2, 0.0)
        return TrainChunk([sample] * count) if count else None


def make(policy: str, source: FakeSource, tpot_s: float = 0.1, **train: object) -> Scheduler:
    config = TrainConfig(policy=policy, **train)  # type: ignore[arg-type]
    return Scheduler(EngineConfig(max_num_batched_tokens=64), BlockPool(256, 16), clock=lambda: 1000.0,
                     slo=SloConfig(tpot_s=tpot_s), policy=make_policy(config), train_source=source)


def teach_latency(scheduler: Scheduler) -> None:
    """Make the latency model know: 10 ms base, 2 ms per decode token, 5 ms per training token."""
    for decode in range(1, 9):
        for train in (0, 8, 16):
            shape = StepShape(0, decode, train)
            scheduler.latency.observe(shape, 0.01 + 0.002 * decode + 0.005 * train)


def train_tokens_with_running(scheduler: Scheduler, num_running: int) -> int:
    for i in range(num_running):
        scheduler.add_request(make_request(f"r{i}-{id(scheduler)}", 4, max_tokens=100))
    plan = scheduler.schedule()
    scheduler.update(plan, RunnerOutput({c.request.request_id: 7 for c in plan.chunks if c.samples_token}, 0.0))
    plan = scheduler.schedule()  # all decoding now
    return plan.train.num_tokens if plan.train is not None else 0


def test_mace_training_never_pushes_predicted_step_past_tpot() -> None:
    for num_running in (1, 4, 8):
        scheduler = make("mace", FakeSource(drift=5.0))
        teach_latency(scheduler)
        train_tokens = train_tokens_with_running(scheduler, num_running)
        predicted = scheduler.latency.predict(StepShape(0, num_running, train_tokens))
        assert train_tokens > 0
        assert predicted <= scheduler.slo.tpot_s + 1e-9


def test_mace_trains_more_when_drift_rises_and_nearly_nothing_when_flat() -> None:
    budgets = []
    for drift in (1.0, 1.1, 1.3, 2.0):
        scheduler = make("mace", FakeSource(drift=drift), tpot_s=0.3)
        teach_latency(scheduler)
        budgets.append(train_tokens_with_running(scheduler, 2))
    assert budgets[0] == 0
    assert budgets == sorted(budgets) and budgets[-1] > budgets[1]


def test_continuous_trains_a_fixed_chunk_whatever_the_drift() -> None:
    for drift in (1.0, 3.0):
        scheduler = make("continuous", FakeSource(drift=drift), chunk_tokens=16)
        assert train_tokens_with_running(scheduler, 2) == 16


def test_periodic_stops_serving_while_it_trains() -> None:
    source = FakeSource(num_new_samples=50)
    scheduler = make("periodic", source, periodic_min_samples=10, periodic_steps=2)
    scheduler.add_request(make_request("served", 4, max_tokens=100))
    plan = scheduler.schedule()
    assert plan.train is not None and plan.chunks == []  # the round started: no inference this step
    scheduler.policy.on_optimizer_step(0.0)
    scheduler.policy.on_optimizer_step(0.0)
    source.num_new_samples = 0
    plan = scheduler.schedule()
    assert plan.train is None and [c.request.request_id for c in plan.chunks] == ["served"]


def test_none_never_trains() -> None:
    scheduler = make("none", FakeSource(drift=10.0))
    assert train_tokens_with_running(scheduler, 1) == 0


def test_mace_idle_steps_stay_short_enough_for_a_new_arrival() -> None:
    scheduler = make("mace", FakeSource(drift=5.0, sample_tokens=8), idle_chunk_tokens=512)
    teach_latency(scheduler)
    plan = scheduler.schedule()  # nothing to serve: training takes the step, but a bounded one
    assert plan.train is not None
    assert scheduler.latency.predict(StepShape(0, 0, plan.train.num_tokens)) <= 0.5 * scheduler.slo.ttft_s + 0.01
