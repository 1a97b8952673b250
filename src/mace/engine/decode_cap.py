"""How many requests run at once under SLO scheduling, and who gives way (tensor-free).

A CPU or small GPU decodes a bigger batch more slowly per token, so past some size every stream
misses a tight TPOT target. The decode cap keeps the batch at what the latency model puts inside
the tightest TPOT of any class; at the cap, an arrival with a tighter TTFT target takes the place of
the running request with the loosest deadline, which is preempted and recomputed later.

A "place" is one of the cap's requests; the KV cache's rows (`kv_cache.py`) and the trainer's
adapter copies are other things.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from mace.config import SloConfig
from mace.engine.latency import LatencyModel, StepShape
from mace.engine.request import Request

MAX_YIELDS = 2  # times a running request gives its place to a more urgent class before it keeps it
FLAT_TOLERANCE = 0.05  # a batch whose step costs within this of one request's costs its streams nothing


def decode_cap(latency: LatencyModel, slo: SloConfig, max_num_seqs: int, prefill_tokens: int = 0,
               chunk_share: float = 1.0) -> int:
    """The most requests whose mean step fits the tightest class's TPOT, less what requests' outcomes
    say the model underestimates their mean step by (`LatencyModel.mean_margin_s`), with a prompt chunk
    of `prefill_tokens` in `chunk_share` of the steps (once the model has measured prefill). A TPOT is
    the mean of a request's steps: under load a prompt is prefilled beside the decodes in most steps,
    and a batch that only fits alone would then miss; with one arrival every few seconds, a chunk
    counted in full at every step would shrink the batch for a cost its requests rarely pay."""
    target_s = tightest_tpot_s(slo) - latency.mean_margin_s
    chunk = StepShape(num_prefill_tokens=prefill_tokens, num_prefill_chunks=1)
    if prefill_tokens > 0 and latency.is_measured(chunk):
        target_s -= chunk_share * latency.marginal_s(chunk)
    return _fitting(latency, target_s, max_num_seqs)


def hard_decode_cap(latency: LatencyModel, slo: SloConfig, max_num_seqs: int) -> int:
    """The most requests whose decode step alone the model puts within the tightest TPOT, no margin:
    what the cap may grow to before a waiting request misses its first token (`Scheduler.decode_cap`)."""
    return _fitting(latency, tightest_tpot_s(slo), max_num_seqs)


def tightest_tpot_s(slo: SloConfig) -> float:
    return min(slo.target(name).tpot_s for name in slo.class_names)


def _fitting(latency: LatencyModel, target_s: float, max_num_seqs: int) -> int:
    """The most requests whose predicted step fits `target_s`, or costs within `FLAT_TOLERANCE` of one
    request's step: where even one request misses the target (a target near a GPU's step time, less
    the margins), a smaller batch buys its streams no TPOT, and a GPU decodes 8 in about the time of 1
    (docs/results/gpu_coserve.md): capping there only queues requests."""
    limit_s = max(target_s, latency.predict(StepShape(num_decode_tokens=1)) * (1 + FLAT_TOLERANCE))
    cap = 1
    while cap < max_num_seqs and latency.predict(StepShape(num_decode_tokens=cap + 1)) <= limit_s:
        cap += 1
    return cap


def gives_way(running: Request, ttft_s: float, deadline_s: float) -> bool:
    """Whether `running` yields its place to a waiting request with this TTFT target and deadline."""
    looser = running.ttft_s > ttft_s and running.ttft_deadline_s > deadline_s
    return looser and running.num_preemptions < MAX_YIELDS


def victims_at_cap(waiting: Iterable[Request], running: list[Request], cap: int) -> list[Request]:
    """Running requests to preempt so that more urgent waiting ones (in queue order) get a place.

    Only for a tighter TTFT target and an earlier deadline, and a bounded number of times per
    request, so nothing starves.
    """
    victims: list[Request] = []
    free = cap - len(running)
    for request in waiting:
        if free > 0:
            free -= 1
            continue
        looser = [r for r in running if r not in victims and gives_way(r, request.ttft_s, request.ttft_deadline_s)]
        if not looser:
            break
        victims.append(max(looser, key=lambda r: (r.ttft_deadline_s, r.queue_seq)))
    return victims


def wait_for_place_s(latency: LatencyModel, blocking: list[Request], num_wanting: int, cap: int) -> float:
    """How long `num_wanting` requests wait for room under the cap: whole waves of the `blocking`
    running requests finishing, each as long as their mean remaining output at the capped step time."""
    short = num_wanting - (cap - len(blocking))
    if short <= 0 or not blocking:
        return 0.0
    remaining = sum(r.sampling_params.max_tokens - r.num_output_tokens for r in blocking) / len(blocking)
    return math.ceil(short / cap) * remaining * latency.predict(StepShape(num_decode_tokens=cap))
