"""`EngineLoad`: what the engine holds and has done, as one immutable snapshot.

The engine thread builds one after every step (and every idle wake) and swaps it in whole; the event
loop (admission, /metrics, /v1/stats) reads only that snapshot, so no reader sees the scheduler's
lists or counters mid-step, and a scrape costs one attribute read however many gauges it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

from mace.train.stats import TrainStats


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    kv_bytes_per_token: int
    kv_bytes_allocated: int
    kv_blocks_cached: int
    kv_bytes_cached: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found
    memory_budget_bytes: int
    memory_learning_bytes: int  # adapter versions and the learner's optimizer state
    memory_training_bytes: int  # activations reserved for training now
    num_preemptions: int
    num_steps: int
    step_time_s_total: float
    forward_time_s_total: float
    latency_error_s: float
    latency_margin_s: float
    decode_cap: int  # the most requests the scheduler runs at once now
    adapter_version: int  # the version new requests pin
    train: TrainStats | None

    @property
    def kv_budget_bytes(self) -> int:
        return self.kv_blocks_total * self.kv_block_size * self.kv_bytes_per_token

    @property
    def kv_used_bytes(self) -> int:
        return self.kv_blocks_used * self.kv_block_size * self.kv_bytes_per_token
