"""When, and how far, a sequence's KV is pruned (tensor-free; off unless `memory.kv_pruning`).

A sequence is pruned when its KV would pass `memory.prune_seq_tokens` (down to 7/8 of it, so
pruning recurs every budget/8 tokens, not every token), or when memory is short and it would
otherwise be preempted (down to `memory.prune_keep_ratio` of its KV). What survives is chosen by
the runner, H2O/SnapKV style: the first `prune_sink_tokens` (attention sinks), a recent window
(at least `prune_recent_tokens`, at least half of the rest), and the middle tokens that received
the most attention so far, smoothed over neighbours. Pruned
positions are gone for good: the request's slot compacts, `num_pruned_tokens` counts them, and
its blocks shrink in the pool. A pruned sequence's KV no longer matches its token positions, so
it is never saved to the prefix cache.
"""

from __future__ import annotations

from mace.config import MemoryConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.plan import KVPrune
from mace.engine.request import Request

HYSTERESIS = 7 / 8


def split_keep(keep_tokens: int, sink_tokens: int, recent_tokens: int) -> tuple[int, int]:
    """(sinks, recent window) of a pruned sequence keeping `keep_tokens`: as in H2O, at least half of
    what is not a sink goes to the recent window, the rest to the most attended middle tokens."""
    num_sink = min(sink_tokens, keep_tokens)
    num_recent = min(max(recent_tokens, (keep_tokens - num_sink) // 2), keep_tokens - num_sink)
    return num_sink, num_recent


class KVPruner:
    def __init__(self, config: MemoryConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.num_pruned_tokens = 0
        self._pending: list[KVPrune] = []

    @property
    def min_keep_tokens(self) -> int:
        return self.config.prune_sink_tokens + self.config.prune_recent_tokens

    def prune_over_budget(self, request: Request, num_new: int) -> None:
        """Keep the request's KV within the per-sequence budget after it adds `num_new` tokens."""
        budget = self.config.prune_seq_tokens
        if budget and request.num_kv_tokens + num_new > budget:
            self._prune(request, max(int(budget * HYSTERESIS) - num_new, self.min_keep_tokens))

    def prune_for_memory(self, request: Request) -> bool:
        """Memory is short for `request`: shrink its own KV instead of preempting; False if too short to."""
        keep = max(int(request.num_kv_tokens * self.config.prune_keep_ratio), self.min_keep_tokens)
        return self._prune(request, keep) > 0

    def _prune(self, request: Request, keep_tokens: int) -> int:
        num_kv = request.num_kv_tokens
        if keep_tokens >= num_kv:
            return 0
        num_sink, num_recent = split_keep(keep_tokens, self.config.prune_sink_tokens, self.config.prune_recent_tokens)
        self._pending.append(KVPrune(request.request_id, num_kv, keep_tokens, num_sink, num_recent))
        request.num_pruned_tokens += num_kv - keep_tokens
        self.num_pruned_tokens += num_kv - keep_tokens
        return self.pool.shrink(request.request_id, keep_tokens)

    def take_prunes(self) -> list[KVPrune]:
        prunes, self._pending = self._pending, []
        return prunes
