"""Prefix sharing: KV already computed, found again to the token by a hash chain (tensor-free).

A block's key hashes its parent's key and its tokens, and the chain starts from the adapter
version, so a hit on block i means the whole prefix up to it matched under the same weights: KV
computed under version N is never used under N+1. Cached blocks are owned by the cache in the
`BlockPool` (they count against the budget); the runner keeps their tensors and applies the
`BlockCopy`s this cache logs: `save` (a request's computed tokens into the cache), `load` (a
cached prefix into an admitted request's slot, instead of prefilling it) and `drop` (evicted).

Sharing goes to the token: after the chain of whole blocks that match, the cached child block
(whole, or the partial last block of a prompt or a finished request) that shares the most leading
tokens with what follows lends just those tokens. Sharing is copy-on-write: a cached block is
never written, a load copies it into the request's own slot before the request's first write
there, and a longer version of a partial block is saved as a new block that supersedes it.

Eviction is least recently used first. Touching a chain moves it leaf first, root last, to the
recent end, so every block sits before its parent: the oldest block is always a leaf, and an
evicted block never leaves an unreachable child behind (partial blocks are always leaves).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from mace.engine.kv_blocks import BlockPool
from mace.engine.plan import BlockCopy
from mace.engine.request import Request

CACHE_OWNER = "<prefix-cache>"
ROOT_PREFIX = b"mace-adapter-v"


def root_key(request: Request) -> bytes:
    """The parent of a request's first block: its pinned adapter version, in its lineage (version 0 is
    the base model in every lineage, so tenants share its KV)."""
    key = ROOT_PREFIX + str(request.adapter_version).encode()
    return key + b"@" + request.tenant.encode() if request.tenant and request.adapter_version else key


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def extend_block_hashes(request: Request, block_size: int) -> list[bytes]:
    """The keys of the request's full blocks of known tokens (kept on the request, extended lazily)."""
    hashes = request.block_hashes
    num_full = request.num_tokens // block_size
    if len(hashes) < num_full:
        tokens = request.token_ids_slice(len(hashes) * block_size, num_full * block_size)
        parent = hashes[-1] if hashes else root_key(request)
        for start in range(0, len(tokens), block_size):
            parent = block_key(parent, tokens[start : start + block_size])
            hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks a request starts from (whole blocks, then maybe one lent in part) and how
    many of their tokens it reuses."""

    keys: list[bytes] = field(default_factory=list)
    num_tokens: int = 0


class PrefixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.share_partial_blocks = True  # False: whole blocks only (the benchmark's comparison)
        self._block_of: dict[bytes, int] = {}
        self._parent_of: dict[bytes, bytes] = {}  # a root key for first blocks
        self._tokens_of: dict[bytes, tuple[int, ...]] = {}  # block_size of them, fewer for a partial block
        self._children: dict[bytes, dict[bytes, None]] = {}  # by parent key: where a token-wise match looks
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

    def match(self, request: Request) -> PrefixHit:
        """The longest cached prefix of `request`, to the token, pinned until `commit` or `unpin`.

        At least one token is left to run: its logits sample the first output token.
        """
        size, limit = self.pool.block_size, request.num_tokens - 1
        keys: list[bytes] = []
        for key in extend_block_hashes(request, size)[: limit // size]:
            if key not in self._block_of:
                break
            keys.append(key)
        num_tokens = len(keys) * size
        if self.share_partial_blocks and num_tokens < limit:
            parent = keys[-1] if keys else root_key(request)
            wanted = request.token_ids_slice(num_tokens, min(num_tokens + size, limit))
            lent, num_lent = self._best_child(parent, wanted)
            if lent is not None:
                keys.append(lent)
                num_tokens += num_lent
        self._touch(keys)
        self._pinned.update(keys)
        return PrefixHit(keys, num_tokens)

    def _best_child(self, parent: bytes, wanted: list[int]) -> tuple[bytes | None, int]:
        """The cached child of `parent` sharing the most leading tokens with `wanted`, and how many."""
        best, num_best = None, 0
        for key in self._children.get(parent, ()):
            num_shared = _num_common(self._tokens_of[key], wanted)
            if num_shared > num_best:
                best, num_best = key, num_shared
        return best, num_best

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

    def commit(self, request: Request, hit: PrefixHit) -> None:
        """`request` was admitted: it starts after its cached prefix, loaded into its slot."""
        self.unpin()
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += hit.num_tokens
        if request.first_scheduled_time_s is None:
            request.num_cached_tokens = hit.num_tokens
        if hit.keys:
            request.num_computed_tokens = hit.num_tokens
            blocks = tuple(self._block_of[key] for key in hit.keys)
            self._copies.append(BlockCopy("load", blocks, request.request_id, num_tokens=hit.num_tokens))

    def save(self, request: Request, num_tokens: int) -> None:
        """Cache the request's first `num_tokens` computed tokens (a partial last block too), from free
        memory only."""
        num_tokens = min(num_tokens, request.num_computed_tokens)
        if num_tokens <= request.num_saved_tokens or request.num_pruned_tokens:
            return  # a pruned sequence's slot positions no longer match its tokens
        size = self.pool.block_size
        hashes = extend_block_hashes(request, size)[: num_tokens // size]
        num_saved = self._save_full(request, hashes) * size
        # A partial block mid-prefill would be superseded by the next chunk: only a whole prompt's, or more.
        is_partial_kept = self.share_partial_blocks and num_tokens >= request.num_prompt_tokens
        if num_saved == len(hashes) * size < num_tokens and is_partial_kept:
            num_saved = self._save_partial(request, hashes, num_tokens)
        request.num_saved_tokens = max(request.num_saved_tokens, num_saved)

    def _save_full(self, request: Request, hashes: list[bytes]) -> int:
        """Cache the full blocks `hashes` not cached yet; returns how many leading ones now are."""
        size, index = self.pool.block_size, 0
        while index < len(hashes):
            if hashes[index] in self._block_of:
                index += 1
                continue
            start = index
            while index < len(hashes) and hashes[index] not in self._block_of:
                index += 1
            blocks = self.pool.allocate(CACHE_OWNER, index - start, reclaim=False)
            if blocks is None:
                index = start
                break
            for position, block in zip(range(start, index), blocks, strict=True):
                parent = hashes[position - 1] if position else root_key(request)
                tokens = request.token_ids_slice(position * size, (position + 1) * size)
                self._add(hashes[position], parent, tokens, block)
            self._copies.append(BlockCopy("save", tuple(blocks), request.request_id, start, len(blocks) * size))
        self._touch(hashes[:index])
        return index

    def _save_partial(self, request: Request, hashes: list[bytes], num_tokens: int) -> int:
        """Cache the trailing partial block of the first `num_tokens` tokens; returns the tokens cached."""
        start = len(hashes) * self.pool.block_size
        parent = hashes[-1] if hashes else root_key(request)
        tokens = request.token_ids_slice(start, num_tokens)
        lender, num_lent = self._best_child(parent, tokens)
        if lender is None or num_lent < len(tokens):  # else a cached sibling already lends them all
            blocks = self.pool.allocate(CACHE_OWNER, 1, reclaim=False)
            if blocks is None:
                return start
            lender = block_key(parent, tokens)
            self._add(lender, parent, tokens, blocks[0])
            self._copies.append(BlockCopy("save", tuple(blocks), request.request_id, len(hashes), len(tokens)))
        self._touch([*hashes, lender])
        return num_tokens

    def _supersede(self, parent: bytes, tokens: list[int]) -> None:
        """Evict the partial siblings that `tokens` extends: every match they give, it gives too."""
        stale = [key for key in self._children.get(parent, ())
                 if key not in self._pinned and _num_common(self._tokens_of[key], tokens) == len(self._tokens_of[key])]
        self._evict(stale)

    def _add(self, key: bytes, parent: bytes, tokens: list[int], block: int) -> None:
        self._supersede(parent, tokens)
        self._block_of[key] = block
        self._parent_of[key] = parent
        self._tokens_of[key] = tuple(tokens)
        self._children.setdefault(parent, {})[key] = None
        self._lru[key] = None

    def reclaim(self, num_blocks: int) -> int:
        victims: list[bytes] = []
        for key in self._lru:
            if len(victims) >= num_blocks or key in self._pinned:
                break  # pinned blocks are the most recent: nothing older is left to evict
            victims.append(key)
        self._evict(victims)
        return len(victims)

    def _evict(self, keys: list[bytes]) -> None:
        evicted: list[int] = []
        for key in keys:
            del self._lru[key]
            del self._tokens_of[key]
            parent = self._parent_of.pop(key)
            siblings = self._children[parent]
            del siblings[key]
            if not siblings:
                del self._children[parent]
            evicted.append(self._block_of.pop(key))
        if evicted:
            self.pool.free_blocks(CACHE_OWNER, evicted)
            self._copies.append(BlockCopy("drop", tuple(evicted)))

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
        keys = set(self._block_of)
        if sorted(self._block_of.values()) != owned or not keys == set(self._lru) == set(self._tokens_of):
            raise AssertionError("the prefix cache disagrees with the pool")
        if {k for children in self._children.values() for k in children} != keys or any(
            key not in self._children.get(parent, ()) for key, parent in self._parent_of.items()
        ):
            raise AssertionError("the children index disagrees with the parents")
        whole = {key for key, tokens in self._tokens_of.items() if len(tokens) == self.pool.block_size}
        if any(parent not in whole and not parent.startswith(ROOT_PREFIX) for parent in self._parent_of.values()):
            raise AssertionError("a cached block outlived its whole parent: it can never be found again")


def _num_common(cached: Sequence[int], wanted: Sequence[int]) -> int:
    """How many leading tokens the two share."""
    for index, (a, b) in enumerate(zip(cached, wanted, strict=False)):
        if a != b:
            return index
    return min(len(cached), len(wanted))
