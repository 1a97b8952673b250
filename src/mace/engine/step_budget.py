"""How long the next step may take, and how many prompt tokens fit in it (tensor-free).

Every number here comes from the latency model and the requests' SLO targets: the step budget that
keeps each decoding stream within its TPOT target, the prompt tokens that fit beside those decodes,
the slack training may take from requests still waiting for their first token, and the TTFT that
admission predicts for an arrival.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mace.config import EngineConfig, SloConfig
from mace.engine.decode_cap import gives_way, wait_for_place_s
from mace.engine.latency import LatencyModel, StepShape
from mace.engine.request import Request

MIN_PREFILL_CHUNK = 16


class StepBudget:
    def __init__(self, config: EngineConfig, slo: SloConfig, latency: LatencyModel,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.slo = slo
        self.latency = latency
        self.clock = clock

    def tpot_target_s(self, request: Request) -> float:
        """A request's TPOT target (one without a class has the default)."""
        return request.tpot_s if math.isfinite(request.tpot_s) else self.slo.tpot_s

    def step_budget_s(self, decoding: list[Request]) -> float:
        """How long the next step may take for every decoding request to keep its TPOT target.

        TPOT is a request's mean time between tokens, so a request that has run slower than its target
        so far gets a shorter step, which brings its mean back under the target before it ends. One
        that ran faster does not get a longer one: banked time is not spent on a visible stall. A
        preempted request is held to its target alone: its wait to be readmitted is not made up for.

        A young request's mean rests on few gaps (a two-token answer's on this one alone), so one slow
        step decides it, where a long stream's mean absorbs it: its step keeps the tail margin free
        rather than the usual one, the difference shared over the gaps it will have after this step.
        """
        now_s, budgets = self.clock(), []
        tail_extra_s = self.latency.tail_margin_s - self.latency.error_margin_s
        for request in decoding:
            target_s = self.tpot_target_s(request)
            first_s = request.first_token_time_s
            num_gaps = max(1, request.num_output_tokens)  # intervals between tokens after this step
            if first_s is not None and not request.num_preemptions:
                target_s = min(target_s, target_s * num_gaps - (now_s - first_s))
            budgets.append(max(0.0, target_s - tail_extra_s / num_gaps))
        return min(budgets, default=self.slo.tpot_s)

    def prefill_budget(self, running: list[Request]) -> int:
        """Prompt tokens that fit beside this step's decodes without passing their TPOT target.

        Long prompts are prefilled in chunks of this size, so an arrival never stalls the requests
        that are streaming. A minimum chunk keeps prefill moving on a pessimistic estimate; it is never
        smaller than the tokens that cost as much as a chunk's fixed cost, since cutting a prompt finer
        than that only adds that cost again for the streams and for the prompt's own first token.
        """
        decoding = [request for request in running if not request.is_prefilling]
        per_token_s = self.latency.marginal_s(StepShape(num_prefill_tokens=1))
        if not decoding or per_token_s <= 0:
            return self.config.max_num_batched_tokens
        # The step with an empty prompt chunk beside the decodes: with a prompt beside it, a lone decode's
        # forward becomes a matrix product, whose step the decode alone does not pay.
        with_chunk = StepShape(num_prefill_tokens=1, num_decode_tokens=len(decoding), num_prefill_chunks=1)
        spare_s = (self.step_budget_s(decoding) - (self.latency.predict(with_chunk) - per_token_s)
                   - self.latency.error_margin_s)
        return max(self.min_prefill_chunk(), int(spare_s / per_token_s))

    def min_prefill_chunk(self) -> int:
        """The smallest prompt chunk worth a step: at least the tokens that cost as much as a chunk's fixed cost."""
        per_token_s = self.latency.marginal_s(StepShape(num_prefill_tokens=1))
        if per_token_s <= 0:
            return MIN_PREFILL_CHUNK
        chunk_s = self.latency.marginal_s(StepShape(num_prefill_chunks=1))
        return min(self.config.max_num_batched_tokens, max(MIN_PREFILL_CHUNK, math.ceil(chunk_s / per_token_s)))

    def _prefill_step_s(self, running: list[Request]) -> tuple[int, float]:
        """Prompt tokens per step beside the current decodes, and the predicted time of such a step."""
        room = max(1, self.prefill_budget(running))
        num_decoding = sum(1 for r in running if not r.is_prefilling)
        return room, self.latency.predict(StepShape(room, num_decoding, num_prefill_chunks=1))

    def ttft_slack_s(self, running: list[Request], waiting: list[Request]) -> float:
        """How long training may delay the requests still waiting for their first token: the least
        of their deadlines less when their prompts, and those ahead of them, finish prefilling at the
        rate the latency model predicts beside the current decodes (the prefill this step plans is
        the first of those steps)."""
        pending = [r for r in [*running, *waiting] if r.first_token_time_s is None]
        if not pending:
            return math.inf
        room, step_s = self._prefill_step_s(running)
        now_s, ahead, slack_s = self.clock(), 0, math.inf
        for request in pending:
            ahead += request.num_uncomputed_tokens
            slack_s = min(slack_s, request.ttft_deadline_s - now_s - math.ceil(ahead / room) * step_s)
        return slack_s

    def predict_ttft_s(self, num_prompt_tokens: int, ttft_s: float, now_s: float, waiting: list[Request],
                       running: list[Request], cap: int) -> float:
        """How long a request arriving now would wait for its first token.

        The prompt tokens queued ahead of it (by deadline) are prefilled at the rate the latency model
        predicts for steps beside the current decodes.
        """
        deadline = now_s + ttft_s
        queued = [r for r in waiting if self.config.scheduling == "fcfs" or r.ttft_deadline_s <= deadline]
        ahead = sum(r.num_uncomputed_tokens for r in queued)
        ahead += sum(r.num_uncomputed_tokens for r in running if r.is_prefilling)
        room, step_s = self._prefill_step_s(running)
        prefill_s = math.ceil((ahead + num_prompt_tokens) / room) * step_s
        # Running requests that would give their place up to it (a looser class, a later deadline,
        # yields left) do not block it; all others do.
        blocking = [r for r in running if not gives_way(r, ttft_s, deadline)]
        return prefill_s + wait_for_place_s(self.latency, blocking, len(queued) + 1, cap)
