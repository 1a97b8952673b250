"""Logical KV memory: fixed-size token blocks owned by requests (tensor-free).

The scheduler consults this pool before it plans a step, so a step never needs more KV than
the budget holds. The runner keeps the physical tensors; this pool is the source of truth for
how much of the budget is in use.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV budget holds no block; raise engine.kv_budget_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owned: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._owned.get(request_id, ()))

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must add so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - self.num_blocks_of(request_id))

    def can_hold(self, request_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks(request_id, num_tokens) <= len(self._free)

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id` hold `num_tokens` tokens; False (and no change) if memory is short."""
        needed = self.num_new_blocks(request_id, num_tokens)
        if needed > len(self._free):
            return False
        owned = self._owned.setdefault(request_id, [])
        owned.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, request_id: str) -> int:
        blocks = self._owned.pop(request_id, [])
        self._free.extend(blocks)
        return len(blocks)

    def owners(self) -> dict[str, list[int]]:
        return {rid: list(blocks) for rid, blocks in self._owned.items()}
