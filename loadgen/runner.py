"""Runs a load test: spawns users (closed loop) or dispatches arrivals (open loop), stops on the
duration or the request count, and polls the server's adapter version meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loadgen.arrivals import arrival_times, between, gamma_gaps, poisson_gaps
from loadgen.context import Recorder, RunContext, Workload
from loadgen.metrics import RequestRecord
from loadgen.traces import TraceItem
from loadgen.users import USER_KINDS, FeedbackUser, User
from mace.client import AsyncClient, MaceError, NotFoundError

Arrival = Literal["closed", "poisson", "bursty", "replay"]


@dataclass
class RunConfig:
    url: str
    arrival: Arrival = "closed"
    users: int = 4  # closed loop: how many users
    spawn_rate: float = 10.0  # closed loop: users started per second
    wait: tuple[float, float] | None = None  # closed loop: think time range; None keeps the classes' own
    rate: float = 2.0  # poisson/bursty: requests per second
    burstiness: float = 4.0  # bursty: squared coefficient of variation of the gaps
    time_scale: float = 1.0  # replay: trace seconds are multiplied by this
    duration_s: float | None = None
    requests: int | None = None
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {"feedback": 1.0})  # user kind -> weight
    feedback_fraction: float = 1.0
    temperature: float = 0.0  # greedy by default: answers are then comparable across policies
    timeout_s: float = 60.0
    grace_s: float = 30.0  # how long requests in flight may finish once the run stops
    poll_s: float = 1.0  # adapter version polling period; 0 disables
    model: str | None = None
    api_key: str | None = None


@dataclass
class RunResult:
    records: list[RequestRecord]
    events: list[dict[str, Any]]
    duration_s: float
    started_at: float  # wall clock (time.time()) of the run's start


def user_classes(mix: dict[str, float]) -> list[tuple[type[User], float]]:
    unknown = sorted(set(mix) - set(USER_KINDS))
    if unknown:
        raise ValueError(f"unknown user kinds {unknown}: use {', '.join(USER_KINDS)}")
    classes = [(USER_KINDS[kind], weight) for kind, weight in mix.items() if weight > 0]
    if not classes:
        raise ValueError("the user mix has no positive weight")
    return classes


def assign(classes: list[tuple[type[User], float]], count: int) -> list[type[User]]:
    """`count` users spread over the classes in proportion to their weights (largest remainder),
    interleaved so that spawning in order keeps the proportions at every step."""
    total = sum(w for _, w in classes)
    shares = [count * w / total for _, w in classes]
    counts = [int(s) for s in shares]
    for index in sorted(range(len(classes)), key=lambda i: counts[i] - shares[i])[: count - sum(counts)]:
        counts[index] += 1
    order: list[tuple[float, int]] = []
    for index, n in enumerate(counts):
        order.extend(((k + 0.5) / n, index) for k in range(n))
    return [classes[index][0] for _, index in sorted(order)]


class Runner:
    """`user_types` (User subclasses, weighted by their `weight`) replaces `config.mix`, for user
    classes written locust-style outside loadgen."""

    def __init__(self, config: RunConfig, items: list[TraceItem],
                 on_tick: Callable[[RunContext], None] | None = None,
                 user_types: Sequence[type[User]] | None = None) -> None:
        if config.duration_s is None and config.requests is None and config.arrival != "replay":
            raise ValueError("give a duration or a request count (only a replay ends by itself)")
        self.config = config
        self.items = items
        self.classes = [(cls, cls.weight) for cls in user_types] if user_types else user_classes(config.mix)
        self.on_tick = on_tick

    async def run(self) -> RunResult:
        config = self.config
        started_at = time.time()
        # No retries: a load generator records each refusal (429, 503) as it happened.
        async with AsyncClient(config.url, config.api_key, config.timeout_s, config.model, max_retries=0) as client:
            cycle = config.arrival != "replay"
            ctx = RunContext(client, Workload(self.items, config.requests, cycle), Recorder(), config.seed,
                             {"temperature": config.temperature})
            helpers = [asyncio.create_task(self._poll_adapters(ctx)), asyncio.create_task(self._tick(ctx))]
            if config.duration_s is not None:
                helpers.append(asyncio.create_task(self._stop_after(ctx, config.duration_s)))
            try:
                if config.arrival == "closed":
                    await self._closed(ctx)
                else:
                    await self._open(ctx)
            finally:
                ctx.stop.set()
                for helper in helpers:
                    helper.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
            if self.on_tick is not None:
                self.on_tick(ctx)
            return RunResult(ctx.recorder.records, ctx.recorder.events, ctx.now(), started_at)

    def _user(self, cls: type[User], ctx: RunContext, index: int) -> User:
        if self.config.wait is not None:
            # A same-named subclass: wait times are class attributes that bind like methods, as in locust.
            cls = type(cls.__name__, (cls,), {"wait_time": between(*self.config.wait)})
        user = cls(ctx, f"{cls.__name__}-{index}", self.config.seed)
        if isinstance(user, FeedbackUser):
            user.feedback_fraction = self.config.feedback_fraction
        return user

    async def _closed(self, ctx: RunContext) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            for index, cls in enumerate(assign(self.classes, self.config.users)):
                if ctx.stopping or ctx.workload.exhausted:
                    break
                tasks.append(asyncio.create_task(self._lifetime(self._user(cls, ctx, index))))
                if index + 1 < self.config.users:
                    await ctx.sleep(1.0 / self.config.spawn_rate)
            await self._finish(ctx, tasks)
        finally:
            await _cancel(tasks)

    async def _lifetime(self, user: User) -> None:
        try:
            await user.on_start()
            await user.run()
        finally:
            await user.on_stop()

    async def _open(self, ctx: RunContext) -> None:
        config = self.config
        rng = random.Random(f"arrivals-{config.seed}")
        users = [self._user(cls, ctx, index) for index, (cls, _) in enumerate(self.classes)]
        weights = [w for _, w in self.classes]
        for user in users:
            await user.on_start()
        tasks: list[asyncio.Task[Any]] = []
        try:
            for arrival_s, item in self._schedule(ctx, rng):
                if not await ctx.sleep_until(arrival_s):
                    break
                user = rng.choices(users, weights)[0]
                tasks.append(asyncio.create_task(user.execute(item, arrival_s)))
            await self._finish(ctx, tasks)
        finally:
            await _cancel(tasks)
            for user in users:
                await user.on_stop()

    def _schedule(self, ctx: RunContext, rng: random.Random) -> Iterator[tuple[float, TraceItem]]:
        config = self.config
        if config.arrival == "replay":
            for item in self.items[: config.requests]:
                yield item.time * config.time_scale, item
            return
        if config.arrival == "poisson":
            gaps = poisson_gaps(config.rate, rng)
        elif config.arrival == "bursty":
            gaps = gamma_gaps(config.rate, config.burstiness, rng)
        else:
            raise ValueError(f"unknown arrival process {config.arrival!r}")
        for arrival_s in arrival_times(gaps):
            claimed = ctx.workload.claim()
            if claimed is None:
                return
            yield arrival_s, claimed

    async def _finish(self, ctx: RunContext, tasks: list[asyncio.Task[Any]]) -> None:
        """Wait for the tasks; once the run stops, give those in flight `grace_s` more."""
        pending = {t for t in tasks if not t.done()}
        stopped = asyncio.create_task(ctx.stop.wait())
        try:
            while pending and not ctx.stopping:
                done, _ = await asyncio.wait([*pending, stopped], return_when=asyncio.FIRST_COMPLETED)
                pending -= done
            if pending:
                await asyncio.wait(pending, timeout=self.config.grace_s)
        finally:
            stopped.cancel()
            await asyncio.gather(stopped, return_exceptions=True)

    async def _stop_after(self, ctx: RunContext, seconds: float) -> None:
        await asyncio.sleep(seconds)
        ctx.stop.set()

    async def _poll_adapters(self, ctx: RunContext) -> None:
        """The active adapter version, every poll_s. A server without GET /v1/adapters (another
        OpenAI-compatible server, an older mace) answers 404: polling stops, the run goes on, and the
        versions still come from the responses' fingerprints."""
        while self.config.poll_s > 0:
            try:
                adapters = await ctx.client.adapters()
            except NotFoundError:
                return
            except MaceError:
                pass  # a refusal or a blip: ask again next time
            else:
                ctx.recorder.note_adapter(adapters.active, ctx.now(), "poll")
            await asyncio.sleep(self.config.poll_s)

    async def _tick(self, ctx: RunContext) -> None:
        while self.on_tick is not None:
            self.on_tick(ctx)
            await asyncio.sleep(0.5)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)
