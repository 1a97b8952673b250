"""Warm-up: a few synthetic requests through the real step path before the server says it is ready.

The latency model plans every step (chunked prefill, the decode cap, training's share of the slack),
and on its priors alone the first users' steps are guesses. A handful of prompts of different
lengths, then a burst of short ones decoding together, measure prefill and decode on this machine
first (without the burst, a fit over one to four decodes cannot tell a decode's cost from the
fixed cost of a step, and the decode cap comes out at its maximum); the first kernel
launches and allocations happen here too, not in a user's first token. A second or two on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mace.engine.request import Request, SamplingParams

if TYPE_CHECKING:
    from mace.engine.engine import Engine

PROMPT_LENGTHS = (16, 48, 96, 160)
OUTPUT_TOKENS = 6
BURST_PROMPTS = 12  # short prompts that arrive together, after the staggered ones
BURST_PROMPT_TOKENS = 8
MAX_STEPS = 256


@dataclass(frozen=True)
class WarmUpReport:
    steps: int
    max_decodes: int  # the most requests that decoded together in one step


def warm_up(engine: Engine) -> WarmUpReport:
    """Serve the synthetic requests to the end on the calling (engine) thread.

    The first ones arrive one step apart and ask for different lengths, so the steps mix prompt
    chunks of several sizes with one to four decodes; then a burst of short prompts decodes as a
    batch of up to `BURST_PROMPTS + 4`: enough variety for the model to tell the terms apart.
    """
    lengths = [*PROMPT_LENGTHS, *[BURST_PROMPT_TOKENS] * BURST_PROMPTS]
    steps = max_decodes = 0
    for index, length in enumerate(lengths):
        _add_prompt(engine, index, length)
        if index < len(PROMPT_LENGTHS) - 1 or index == len(lengths) - 1:
            engine.step()
            steps += 1
    while (engine.scheduler.running or engine.scheduler.waiting) and steps < MAX_STEPS:
        engine.step()
        steps += 1
        if engine.last_plan is not None:
            max_decodes = max(max_decodes, engine.last_plan.num_decode_tokens)
    if engine.memory.prefix_cache is not None:
        engine.memory.prefix_cache.clear()  # nobody will ask for these prompts again
    engine.release_idle()
    engine.scheduler.latency.refit()
    engine.scheduler.latency.guard.reset()  # outcomes are learned from users' requests
    return WarmUpReport(steps, max_decodes)


def _add_prompt(engine: Engine, index: int, length: int) -> None:
    max_tokens = OUTPUT_TOKENS + 2 * min(index, len(PROMPT_LENGTHS))
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
