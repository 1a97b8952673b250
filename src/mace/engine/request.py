"""Request state: one dataclass the scheduler, runner and engine loop share (no tensors)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MIN_SAMPLING_TEMPERATURE = 1e-5  # a lower temperature samples greedily


ACTIVE_VERSION = -1  # a request's `adapter_version` until the engine pins its lineage's active one


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. temperature 0 (or under 1e-5) means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be non-negative (0 disables it)")

    @property
    def is_greedy(self) -> bool:
        # Below this, logits / temperature overflow float32 to inf and sampling has no distribution
        # left; the limit of sampling as the temperature goes to 0 is the argmax anyway.
        return self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_k == 1


@dataclass(eq=False)
class Request:
    """A generation request as the engine thread sees it.

    `num_computed_tokens` counts tokens whose KV is in the cache; the tokens still to run through
    the model are `all_token_ids[num_computed_tokens:]` (the prompt's rest while prefilling, the last
    sampled token while decoding, everything again after a preemption). A prefix found in the
    prefix cache starts it at `num_cached_tokens` instead of 0. Lower `priority` is more important:
    admitted first, preempted last.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    arrival_time_s: float
    # ACTIVE_VERSION (what the front end sends): its lineage's active version, pinned by the engine
    # thread when the request arrives (`EngineCore.handle`).
    adapter_version: int = 0
    tenant: str = ""  # the lineage whose versions serve it (mace/tenancy.py; "": the shared one)
    # The words of its prompt, for the lineage's scope (train/scope.py); empty: no scope applies.
    prompt_words: frozenset[str] = frozenset()
    slo_class: str = "interactive"
    ttft_s: float = math.inf  # the class's targets; infinite when no SLO applies
    tpot_s: float = math.inf
    priority: int = 0  # lower is more important (the vLLM convention): preemption takes the highest first
    queue_seq: int = 0  # set by the scheduler: ties in the waiting order go to the earlier enqueued
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_steps_with_training: int = 0  # its steps that also carried training stages (`Scheduler._observe_tpot`)
    predicted_decode_s_total: float = 0.0  # the latency model's time for the steps after its first token
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    num_pruned_tokens: int = 0  # computed tokens whose KV was pruned away (slot positions shift left by this)
    num_saved_tokens: int = 0  # computed tokens already offered to the prefix cache
    num_admission_skips: int = 0  # steps a smaller request was admitted past this one
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks
    first_scheduled_time_s: float | None = None
    first_token_time_s: float | None = None
    error: str | None = None

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_time_s + self.ttft_s

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV the slot holds: the computed ones, less those pruned."""
        return self.num_computed_tokens - self.num_pruned_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        num_prompt = self.num_prompt_tokens
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    @property
    def queue_time_s(self) -> float:
        """From arrival to first being scheduled (0 if never scheduled)."""
        if self.first_scheduled_time_s is None:
            return 0.0
        return self.first_scheduled_time_s - self.arrival_time_s

    def output(self, new_token_ids: list[int]) -> RequestOutput:
        """This step's output: its new tokens, and the ending once the request has finished."""
        finish_reason = self.status.value if self.status.is_finished else None
        return RequestOutput(
            request_id=self.request_id, new_token_ids=new_token_ids, num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens, adapter_version=self.adapter_version,
            finish_reason=finish_reason, error=self.error, num_cached_tokens=self.num_cached_tokens,
            queue_time_s=self.queue_time_s if finish_reason else None,
        )

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions; stop strings are checked on the text side."""
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request: new tokens, and the ending if it ended.

    The engine thread leaves `text` empty; the front end fills it in as it detokenizes (and may end the
    request on a stop string)."""

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    adapter_version: int
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    queue_time_s: float | None = None
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
