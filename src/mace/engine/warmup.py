"""Warm-up: a few synthetic requests through the real step path before the server says it is ready.

The latency model plans every step (chunked prefill, the decode cap, training's share of the slack),
and on its priors alone the first users' steps are guesses. A handful of prompts of different
lengths, decoding together, measure prefill and decode on this machine first; the first kernel
launches and allocations happen here too, not in a user's first token. A second or two on a CPU.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mace.engine.request import Request, SamplingParams

if TYPE_CHECKING:
    from mace.engine.engine import Engine

PROMPT_LENGTHS = (16, 48, 96, 160)
OUTPUT_TOKENS = 6
MAX_STEPS = 256


def warm_up(engine: Engine) -> int:
    """Serve the synthetic requests to the end on the calling (engine) thread; returns the steps taken.

    They arrive one step apart and ask for different lengths, so the steps mix prompt chunks of
    several sizes with one to four decodes: enough variety for the model to tell the terms apart.
    """
    vocab_size = int(engine.bundle.causal_lm.config.vocab_size)
    steps = 0
    for index, length in enumerate(PROMPT_LENGTHS):
        length = min(length, engine.max_model_len - OUTPUT_TOKENS - 1)
        if length < 1:
            continue
        # Different tokens per prompt: shared ones would be served from the prefix cache, not measured.
        prompt = [(17 + 7919 * index + 31 * position) % vocab_size for position in range(length)]
        params = SamplingParams(max_tokens=OUTPUT_TOKENS + 2 * index, temperature=0, ignore_eos=True)
        engine.scheduler.add_request(Request(
            request_id=f"warmup-{index}", prompt_token_ids=prompt, sampling_params=params,
            eos_token_ids=engine.bundle.eos_token_ids, max_model_len=engine.max_model_len,
            arrival_time_s=time.monotonic(),
        ))
        engine.step()
        steps += 1
    while (engine.scheduler.running or engine.scheduler.waiting) and steps < MAX_STEPS:
        engine.step()
        steps += 1
    if engine.memory.prefix_cache is not None:
        engine.memory.prefix_cache.clear()  # nobody will ask for these prompts again
    engine.release_idle()
    engine.scheduler.latency.refit()
    engine.scheduler.latency.guard.reset()  # outcomes are learned from users' requests
    return steps
