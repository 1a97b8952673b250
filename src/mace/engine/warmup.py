"""Warm-up: a few synthetic requests through the real step path before the server says it is ready.

The latency model plans every step (chunked prefill, the decode cap, training's share of the slack),
and on its priors alone the first users' steps are guesses. A handful of prompts of different
lengths, then a burst of short ones decoding together, served twice (the first round pays the first
kernel launches and allocations of each shape; only the second is measured), measure prefill and
decode on this machine first (without the burst, a fit over one to four decodes cannot tell a decode's cost from the
fixed cost of a step, and the decode cap comes out at its maximum); the first kernel
launches and allocations happen here too, not in a user's first token.

With a retraining policy on, a second round serves a few prompts again while a micro-step on
synthetic samples trains beside them and then alone (where training runs on its own thread, a
whole micro-step alone too), its gradients thrown away: otherwise the first
training steps beside users' streams are planned on priors, not on this machine's costs (on the
default model on a CPU the priors are ten times off). Training then eases in (engine/train_planner.py).
A few seconds on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from mace.engine.request import Request, SamplingParams
from mace.train.policy import NoTraining, RetrainPolicy, TrainContext, TrainDecision
from mace.train.rehearsal import ANCHOR_ANSWER_TOKENS, AnchorStore, anchor_prompts
from mace.train.replay import TrainSample

if TYPE_CHECKING:
    from mace.engine.core import EngineCore
    from mace.train.trainer import Trainer

log = structlog.get_logger(__name__)

PROMPT_LENGTHS = (16, 48, 96, 160)
OUTPUT_TOKENS = 6
BURST_PROMPTS = 12  # short prompts that arrive together, after the staggered ones
BURST_PROMPT_TOKENS = 8
MAX_STEPS = 256
TRAIN_SAMPLES = ((48, 8), (96, 16))  # (prompt, answer) tokens of the synthetic micro-step's samples


@dataclass(frozen=True)
class WarmUpReport:
    steps: int
    max_decodes: int  # the most requests that decoded together in one step


def warm_up(engine: EngineCore) -> WarmUpReport:
    """Serve the synthetic requests to the end on the calling (engine) thread, before the loop starts.

    The first ones arrive one step apart and ask for different lengths, so the steps mix prompt
    chunks of several sizes with one to four decodes; then a burst of short prompts decodes as a
    batch of up to `BURST_PROMPTS + 4`: enough variety for the model to tell the terms apart.
    """
    lengths = [*PROMPT_LENGTHS, *[BURST_PROMPT_TOKENS] * BURST_PROMPTS]
    # Inference alone first, even when a restart brought back samples to train: it is what is measured.
    engine.scheduler.is_measuring = True
    try:
        with _training_policy(engine, NoTraining()):
            # The first round pays each new shape's first kernels and allocations (a fp32 step here
            # then takes twice its usual time): measured, those steps made the fit's base and its
            # 95th-percentile margin eat most of the TPOT target, and the decode cap came out at 1-2.
            # Only the second round is measured.
            first_steps, _ = _serve(engine, lengths, first_index=0)
            engine.scheduler.latency.forget_samples()
            steps, max_decodes = _serve(engine, lengths, first_index=len(lengths))
            steps += first_steps
        train = engine.config.train
        wants_anchors = train.rehearsal or train.retention_guard > 0
        if engine.trainer is not None and wants_anchors and not engine.trainer.anchors.samples:
            steps += _generate_anchors(engine, engine.trainer.anchors)
    finally:
        engine.scheduler.is_measuring = False
    if engine.trainer is not None and engine.scheduler.training is not None:
        engine.scheduler.latency.refit()  # training is planned beside inference measured just now
        steps += _train_alongside(engine, first_index=2 * len(lengths))
        engine.scheduler.training.ease_in()
    if engine.memory.prefix_cache is not None:
        engine.memory.prefix_cache.clear()  # nobody will ask for these prompts again
    engine.release_idle()
    engine.scheduler.latency.refit()
    engine.scheduler.latency.guard.reset()  # outcomes are learned from users' requests
    engine.scheduler.latency.request_bias.reset()
    return WarmUpReport(steps, max_decodes)


def _serve(engine: EngineCore, lengths: list[int], first_index: int) -> tuple[int, int]:
    """Prompts of `lengths`, the first ones a step apart and the rest together, served to the end
    (and a warm-up micro-step to its end); returns (steps, the most decodes in one step)."""
    steps = max_decodes = 0
    for offset, length in enumerate(lengths):
        _add_prompt(engine, first_index + offset, length, _output_tokens(offset))
        if offset < len(PROMPT_LENGTHS) - 1 or offset == len(lengths) - 1:
            engine.step()
            steps += 1
    trainer = engine.trainer
    while (engine.scheduler.running or engine.scheduler.waiting or (trainer is not None and trainer.is_warming_up)) \
            and steps < MAX_STEPS:
        engine.step()
        steps += 1
        if engine.last_plan is not None:
            max_decodes = max(max_decodes, engine.last_plan.num_decode_tokens)
    return steps, max_decodes


class _TrainInTheSlack:
    """Warm-up's retraining policy: the synthetic micro-step takes whatever slack each step leaves.
    Users' samples (a restart brings some back) wait for the server to be ready: a micro-step of
    theirs opened here would still be open when warm-up opens its next synthetic one."""

    name = "warm-up"

    def __init__(self, trainer: Trainer, max_job_tokens: int) -> None:
        self.trainer = trainer
        self.max_job_tokens = max_job_tokens

    def decide(self, ctx: TrainContext) -> TrainDecision:
        if not self.trainer.is_warming_up:
            return TrainDecision()
        return TrainDecision(budget_s=ctx.slack_s, max_job_tokens=self.max_job_tokens)

    def on_optimizer_step(self, now_s: float) -> None:
        return None


def _train_alongside(engine: EngineCore, first_index: int) -> int:
    trainer = engine.trainer
    assert trainer is not None
    vocab_size = int(engine.bundle.causal_lm.config.vocab_size)
    samples = []
    for number, (prompt, answer) in enumerate(TRAIN_SAMPLES):
        tokens = [(23 + 7927 * number + 37 * position) % vocab_size for position in range(prompt + answer)]
        samples.append(TrainSample(-1 - number, tokens, prompt, created_at=time.time()))
    trainer.open_warm_up_job(samples)
    seconds_before = trainer.train_seconds_total
    try:
        with _training_policy(engine, _TrainInTheSlack(trainer, sum(len(s.token_ids) for s in samples))):
            steps, _ = _serve(engine, list(PROMPT_LENGTHS), first_index)
            if engine.runner.streams.is_threaded:
                # Beside the forward, on its own thread, a stage's time is hidden in the step's; the
                # planner needs each kind's own cost: one more micro-step with nothing served.
                trainer.open_warm_up_job(samples)
                steps += _serve(engine, [], first_index)[0]
    finally:
        trainer.train_seconds_total = seconds_before  # users' training time only, in /metrics
    return steps


def _generate_anchors(engine: EngineCore, store: AnchorStore) -> int:
    """Serve the rehearsal questions greedily on version 0, as users would get them, and keep the answers
    (train/rehearsal.py); once per model, since the store caches them."""
    started = time.perf_counter()
    requests = []
    for index, prompt in enumerate(anchor_prompts(engine.bundle.tokenizer)):
        requests.append(Request(
            request_id=f"warmup-anchor-{index}", prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=ANCHOR_ANSWER_TOKENS, temperature=0),
            eos_token_ids=engine.bundle.eos_token_ids, max_model_len=engine.max_model_len,
            arrival_time_s=time.monotonic(),
        ))
        engine.scheduler.add_request(requests[-1])
    with _training_policy(engine, NoTraining()):  # all of them in one batch: nobody else is served yet
        steps, _ = _serve(engine, [], first_index=0)
    store.set([(r.prompt_token_ids, list(r.output_token_ids)) for r in requests])
    log.info("rehearsal anchors generated", num=len(requests), seconds=round(time.perf_counter() - started, 2))
    return steps


@contextmanager
def _training_policy(engine: EngineCore, policy: RetrainPolicy) -> Iterator[None]:
    """Plan training with `policy` for the duration (no-op without a trainer)."""
    planner = engine.scheduler.training
    if planner is None:
        yield
        return
    saved, planner.policy = planner.policy, policy
    try:
        yield
    finally:
        planner.policy = saved


def _output_tokens(offset: int) -> int:
    """The staggered prompts answer a few tokens each; the burst's answers grow by two tokens a prompt,
    so the batch drains one request every two steps and the decode-only steps cover every batch size
    from the burst's down to one. Were they equal, every decode-only step would run the whole burst,
    and the fit could not tell a decode's cost from a step's fixed cost: on the default model in fp32
    it put a 150 ms base under the 0.2 s TPOT target, where a one-decode step takes 80 ms, and capped
    decoding at one or two requests."""
    if offset < len(PROMPT_LENGTHS):
        return OUTPUT_TOKENS + 2 * offset
    return 2 * (offset - len(PROMPT_LENGTHS) + 1)


def _add_prompt(engine: EngineCore, index: int, length: int, max_tokens: int) -> None:
    length = min(length, engine.max_model_len - max_tokens - 1)
    if length < 1:
        return
    vocab_size = int(engine.bundle.causal_lm.config.vocab_size)
    # Different tokens per prompt: shared ones would be served from the prefix cache, not measured.
    prompt = [(17 + 7919 * index + 31 * position) % vocab_size for position in range(length)]
    engine.scheduler.add_request(Request(
        request_id=f"warmup-{index}", prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        eos_token_ids=engine.bundle.eos_token_ids, max_model_len=engine.max_model_len,
        arrival_time_s=time.monotonic(),
    ))
