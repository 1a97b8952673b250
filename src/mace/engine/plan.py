"""The typed seams of one engine iteration: what the scheduler plans and what the runner returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mace.engine.latency import StepShape
from mace.engine.request import Request
from mace.train.work import StageKind, TrainWork


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new_tokens` of one request run through the model this step, from `start_position`.

    A chunk that reaches the end of the request's known tokens samples the next token.
    """

    request: Request
    start_position: int
    num_new_tokens: int
    samples_token: bool
    is_decode: bool

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledChunk:
        """Snapshot of the request's position at planning time (the request mutates after the step)."""
        start = request.num_computed_tokens
        return cls(
            request=request,
            start_position=start,
            num_new_tokens=num_new_tokens,
            samples_token=start + num_new_tokens == request.num_tokens,
            is_decode=num_new_tokens == 1 and request.num_output_tokens > 0,
        )

    @property
    def end_position(self) -> int:
        return self.start_position + self.num_new_tokens


@dataclass(frozen=True)
class BlockCopy:
    """KV moved between a request's slot and the prefix cache's block store, by blocks.

    `save`: `num_tokens` of the request's positions from `first_block * block_size` are copied into
    cache blocks `block_ids` (the last one partial when they end mid-block); `load`: the first
    `num_tokens` positions that cache blocks `block_ids` hold, in order, become the request's first
    positions (the last block may be lent in part). `drop`: cache blocks `block_ids` were evicted
    (no request involved).
    """

    kind: Literal["save", "load", "drop"]
    block_ids: tuple[int, ...]
    request_id: str = ""
    first_block: int = 0
    num_tokens: int = 0


@dataclass(frozen=True)
class KVPrune:
    """Shrink a request's KV from `num_kv_tokens` to `keep_tokens`: the first `num_sink` and the last
    `num_recent` stay, the runner keeps the most attended of the rest; positions compact to the front."""

    request_id: str
    num_kv_tokens: int
    keep_tokens: int
    num_sink: int
    num_recent: int


@dataclass(frozen=True)
class IterationPlan:
    """Everything one step does. `released_request_ids` lost their KV since the previous plan.

    The runner applies `kv_copies` in order, then the releases, then `kv_prunes`, then runs the chunks.
    """

    chunks: list[ScheduledChunk]
    released_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    train: TrainWork | None = None
    kv_copies: list[BlockCopy] = field(default_factory=list)
    kv_prunes: list[KVPrune] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_new_tokens for chunk in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for chunk in self.chunks if chunk.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_batched_tokens - self.num_decode_tokens

    @property
    def num_prefill_chunks(self) -> int:
        return sum(1 for chunk in self.chunks if not chunk.is_decode)

    @property
    def shape(self) -> StepShape:
        return shape_of(self.num_prefill_tokens, self.num_decode_tokens, self.train, self.num_prefill_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and self.train is None


def shape_of(num_prefill_tokens: int, num_decode_tokens: int, train: TrainWork | None,
             num_prefill_chunks: int = 0) -> StepShape:
    if train is None:
        return StepShape(num_prefill_tokens, num_decode_tokens, num_prefill_chunks=num_prefill_chunks)
    return StepShape(
        num_prefill_tokens,
        num_decode_tokens,
        train.num_tokens(StageKind.FORWARD),
        train.num_tokens(StageKind.BACKWARD),
        train.num_tokens(StageKind.HEAD),
        num_prefill_chunks,
    )


@dataclass(frozen=True)
class RunnerOutput:
    """Tokens sampled this step, by request id, and how long the model work took."""

    sampled_token_ids: dict[str, int]
    forward_time_s: float
    failed_request_ids: dict[str, str] = field(default_factory=dict)
