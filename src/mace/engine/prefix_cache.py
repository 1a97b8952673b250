"""Prefix sharing: full KV blocks already computed, found again by a hash chain (tensor-free).

A block's key hashes its parent's key and its tokens, and the chain starts from the adapter
version, so a hit on block i means the whole prefix up to it matched under the same weights: KV
computed under version N is never used under N+1. Cached blocks are owned by the cache in the
`BlockPool` (they count against the budget); the runner keeps their tensors and applies the
`BlockCopy`s this cache logs: `save` (a request's computed blocks into the cache), `load` (a
cached prefix into an admitted request's slot, instead of prefilling it) and `drop` (evicted).

Eviction is least recently used first. Touching a chain moves it leaf first, root last, to the
recent end, so every block sits before its parent: the oldest block is always a leaf, and an
evicted block never leaves an unreachable child behind.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from mace.engine.kv_blocks import BlockPool
from mace.engine.plan import BlockCopy
from mace.engine.request import Request

CACHE_OWNER = "<prefix-cache>"


def extend_block_hashes(request: Request, block_size: int) -> list[bytes]:
    """The keys of the request's full blocks of known tokens (kept on the request, extended lazily)."""
    hashes = request.block_hashes
    num_full = request.num_tokens // block_size
    if len(hashes) < num_full:
        tokens = request.token_ids_slice(len(hashes) * block_size, num_full * block_size)
        parent = hashes[-1] if hashes else f"mace-adapter-v{request.adapter_version}".encode()
        for start in range(0, len(tokens), block_size):
            digest = hashlib.blake2b(parent, digest_size=16)
            digest.update(array("q", tokens[start : start + block_size]).tobytes())
            parent = digest.digest()
            hashes.append(parent)
    return hashes


class PrefixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._block_of: dict[bytes, int] = {}
        self._parent_of: dict[bytes, bytes | None] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self._pinned: set[bytes] = set()  # matched for an admission that is being decided
        self._copies: list[BlockCopy] = []
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        pool.shared_owners.add(CACHE_OWNER)
        pool.reclaimers.insert(0, self)  # evicting an unused prefix is cheaper than anything else

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    @property
    def num_reclaimable_blocks(self) -> int:
        return len(self._block_of) - len(self._pinned)

    def match(self, request: Request) -> list[bytes]:
        """The longest cached prefix of `request`, pinned until `commit` or `unpin`; one token is left to run."""
        max_blocks = (request.num_tokens - 1) // self.pool.block_size
        hashes = extend_block_hashes(request, self.pool.block_size)[:max_blocks]
        hit: list[bytes] = []
        for key in hashes:
            if key not in self._block_of:
                break
            hit.append(key)
        self._touch(hit)
        self._pinned.update(hit)
        return hit

    def waits_for_prefill(self, request: Request, prefilling: list[Request]) -> bool:
        """A running request is still prefilling blocks of `request`'s prompt that are not cached yet.

        Admitted now, `request` would compute the same KV a second time beside it (many users sending
        one new system prompt at once); held back until that prefill passes the shared blocks, it
        finds them here and computes only its own tail.
        """
        size = self.pool.block_size
        wanted = extend_block_hashes(request, size)[: (request.num_tokens - 1) // size]
        num_cached = next((i for i, key in enumerate(wanted) if key not in self._block_of), len(wanted))
        for other in prefilling:
            theirs = extend_block_hashes(other, size)
            num_shared = next((i for i, (a, b) in enumerate(zip(wanted, theirs, strict=False)) if a != b),
                              min(len(wanted), len(theirs)))
            if num_shared > num_cached and other.num_computed_tokens < num_shared * size:
                return True
        return False

    def unpin(self) -> None:
        self._pinned.clear()

    def commit(self, request: Request, hit: list[bytes]) -> None:
        """`request` was admitted: it starts after its cached prefix, loaded into its slot."""
        self.unpin()
        num_cached = len(hit) * self.pool.block_size
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_cached
        if request.first_scheduled_time_s is None:
            request.num_cached_tokens = num_cached
        if hit:
            request.num_computed_tokens = num_cached
            blocks = tuple(self._block_of[key] for key in hit)
            self._copies.append(BlockCopy("load", blocks, request.request_id))

    def save(self, request: Request, num_tokens: int) -> None:
        """Cache the full blocks of the request's first `num_tokens` computed tokens, from free memory only."""
        num_full = min(num_tokens, request.num_computed_tokens) // self.pool.block_size
        if num_full <= request.num_saved_blocks or request.num_pruned_tokens:
            return  # a pruned sequence's slot positions no longer match its tokens
        hashes = extend_block_hashes(request, self.pool.block_size)[:num_full]
        index = 0
        while index < num_full:
            if hashes[index] in self._block_of:
                index += 1
                continue
            start = index
            while index < num_full and hashes[index] not in self._block_of:
                index += 1
            blocks = self.pool.allocate(CACHE_OWNER, index - start, reclaim=False)
            if blocks is None:
                index = start
                break
            for position, block in zip(range(start, index), blocks, strict=True):
                self._block_of[hashes[position]] = block
                self._parent_of[hashes[position]] = hashes[position - 1] if position else None
                self._lru[hashes[position]] = None
            self._copies.append(BlockCopy("save", tuple(blocks), request.request_id, start))
        request.num_saved_blocks = max(request.num_saved_blocks, index)
        self._touch(hashes[:index])

    def reclaim(self, num_blocks: int) -> int:
        evicted: list[int] = []
        for key in list(self._lru):
            if len(evicted) >= num_blocks or key in self._pinned:
                break  # pinned blocks are the most recent: nothing older is left to evict
            del self._lru[key]
            del self._parent_of[key]
            evicted.append(self._block_of.pop(key))
        if evicted:
            self.pool.free_blocks(CACHE_OWNER, evicted)
            self._copies.append(BlockCopy("drop", tuple(evicted)))
        return len(evicted)

    def clear(self) -> None:
        """Forget every cached prefix (after a failed step, whose saves may not have happened)."""
        self.unpin()
        self.reclaim(len(self._block_of))

    def take_copies(self) -> list[BlockCopy]:
        """The block copies logged since the last call, in order, for the next plan."""
        copies, self._copies = self._copies, []
        return copies

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):
            self._lru.move_to_end(key)

    def check(self) -> None:
        """The cache's index, LRU order and pool ownership agree (tests call this)."""
        owned = sorted(self.pool.owners().get(CACHE_OWNER, []))
        if sorted(self._block_of.values()) != owned or set(self._lru) != set(self._block_of):
            raise AssertionError("the prefix cache disagrees with the pool")
        if any(parent is not None and parent not in self._block_of for parent in self._parent_of.values()):
            raise AssertionError("a cached block outlived its parent: it can never be found again")
