"""Logical KV memory: fixed-size token blocks, each owned by at most one owner (tensor-free).

Owners are running requests (by request id), the prefix cache and reservations such as the
training micro-batch's activations. The scheduler consults this pool before it plans a step, so
a step never needs more memory than the budget holds; the runner keeps the physical tensors.

When an allocation is short, the pool asks its reclaimers, in order, to give blocks back (the
prefix cache evicts unused prefixes, then training shrinks) before it answers no; only then does
the scheduler preempt a request.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Reclaimer(Protocol):
    """Holds blocks it can give back on demand (cached prefixes, a training reservation)."""

    def reclaim(self, num_blocks: int) -> int:
        """Free up to `num_blocks` blocks back to the pool; returns how many were freed."""
        ...

    @property
    def num_reclaimable_blocks(self) -> int: ...


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, block_bytes: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError("the memory budget holds no KV block; raise memory.budget_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = block_bytes
        self._free: deque[int] = deque(range(num_blocks))
        self._owner_of: dict[int, str] = {}
        self._owned: dict[str, list[int]] = {}
        self.reclaimers: list[Reclaimer] = []
        self.shared_owners: set[str] = set()  # owners that are not requests (cache, reservations)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_available_blocks(self) -> int:
        """Free blocks plus those the reclaimers would give back."""
        return len(self._free) + sum(r.num_reclaimable_blocks for r in self.reclaimers)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests (not by the prefix cache or reservations).

        Read from the event loop for /metrics while the engine thread allocates: single lookups
        only, never an iteration over a dict that may change size.
        """
        shared = sum(len(self._owned.get(owner, ())) for owner in tuple(self.shared_owners))
        return self.num_blocks - len(self._free) - shared

    def num_blocks_owned_by(self, owner: str) -> int:
        return len(self._owned.get(owner, ()))

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
        return self.num_new_blocks(request_id, num_tokens) <= self.num_available_blocks

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id` hold `num_tokens` tokens; False (and no change) if memory is short."""
        return self.allocate(request_id, self.num_new_blocks(request_id, num_tokens)) is not None

    def allocate(self, owner: str, num_blocks: int, reclaim: bool = True) -> list[int] | None:
        """`num_blocks` more blocks for `owner`, reclaiming if allowed; None (and no change) if short."""
        if num_blocks > len(self._free) and not (reclaim and self._reclaim(num_blocks)):
            return None
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        self._owned.setdefault(owner, []).extend(blocks)
        for block in blocks:
            self._owner_of[block] = owner
        return blocks

    def _reclaim(self, num_blocks: int) -> bool:
        """Make `num_blocks` blocks free, or change nothing if even reclaiming could not."""
        if num_blocks > self.num_available_blocks:
            return False  # not enough either way: keep the cached prefixes
        for reclaimer in self.reclaimers:
            missing = num_blocks - len(self._free)
            if missing <= 0:
                break
            reclaimer.reclaim(missing)
        return len(self._free) >= num_blocks

    def free(self, owner: str) -> int:
        blocks = self._owned.pop(owner, [])
        for block in blocks:
            del self._owner_of[block]
        self._free.extend(blocks)
        return len(blocks)

    def shrink(self, owner: str, num_tokens: int) -> int:
        """Give back `owner`'s blocks past those `num_tokens` need (its KV was pruned); returns how many."""
        blocks = self._owned.get(owner, [])
        extra = blocks[self.blocks_for(num_tokens) :]
        if extra:
            self.free_blocks(owner, extra)
        return len(extra)

    def free_blocks(self, owner: str, blocks: list[int]) -> None:
        """Give back some of `owner`'s blocks (one evicted prefix block, a shrunk reservation)."""
        owned = self._owned[owner]
        for block in blocks:
            if self._owner_of.get(block) != owner:
                raise ValueError(f"block {block} is not owned by {owner!r}")
            del self._owner_of[block]
            owned.remove(block)
            self._free.append(block)
        if not owned:
            del self._owned[owner]

    def owners(self) -> dict[str, list[int]]:
        return {owner: list(blocks) for owner, blocks in self._owned.items()}

    def check(self) -> None:
        """Every block is free or owned, exactly once (tests call this after each operation)."""
        owned = [block for blocks in self._owned.values() for block in blocks]
        if len(set(owned)) != len(owned) or set(owned) & set(self._free):
            raise AssertionError("a block is owned twice")
        if sorted(owned + list(self._free)) != list(range(self.num_blocks)):
            raise AssertionError("a block leaked")
        if {b: o for o, blocks in self._owned.items() for b in blocks} != self._owner_of:
            raise AssertionError("the owner index disagrees with the owners' lists")
