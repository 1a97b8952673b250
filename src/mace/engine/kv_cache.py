"""Physical KV storage: one slot (row) per running request, per layer.

    keys[layer], values[layer]: [num_slots, kv_heads, capacity, head_dim]

    importance: [num_slots, layers, kv_heads, capacity] attention each position received, per layer
                and KV head (only with KV pruning on: `track_importance`)

Running requests always occupy slots 0..n-1 (a released slot is refilled by moving the last one),
so batched decode attention reads `keys[layer][:n, :, :max_len]`, a view, without gathering.
Both dimensions grow on demand by doubling, so memory follows the load.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.max_model_len = max_model_len
        self._shape_tail = (num_kv_heads, head_dim)
        self._dtype = dtype
        self._device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.importance = torch.zeros(0)
        self.track_importance = False  # see enable_importance
        self._slot_of: dict[str, int] = {}
        self._owner_of: list[str] = []
        self._allocate(num_slots=8, capacity=min(256, max_model_len))

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_used_slots(self) -> int:
        return len(self._owner_of)

    @property
    def storage_key(self) -> tuple[int, int, int]:
        """Changes whenever the tensors are reallocated (growth): what a CUDA graph reading them depends on."""
        return self.keys[0].data_ptr(), self.num_slots, self.capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def slot(self, request_id: str) -> int:
        return self._slot_of[request_id]

    def has(self, request_id: str) -> bool:
        return request_id in self._slot_of

    def ensure(self, request_id: str, num_tokens: int) -> int:
        """The slot of `request_id`, created if new, with room for `num_tokens` positions."""
        if num_tokens > self.capacity:
            self._grow(self.num_slots, min(self.max_model_len, _next_pow2(num_tokens)))
        if request_id in self._slot_of:
            return self._slot_of[request_id]
        if self.num_used_slots == self.num_slots:
            self._grow(self.num_slots * 2, self.capacity)
        slot = self.num_used_slots
        self._slot_of[request_id] = slot
        self._owner_of.append(request_id)
        self.importance[slot].zero_()  # a previous owner's attention must not count for this one
        return slot

    def release(self, request_id: str) -> None:
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return
        last = len(self._owner_of) - 1
        moved = self._owner_of.pop()
        if slot != last:
            for tensor in [*self.keys, *self.values, self.importance]:
                tensor[slot].copy_(tensor[last])
            self._owner_of[slot] = moved
            self._slot_of[moved] = slot

    def _allocate(self, num_slots: int, capacity: int) -> None:
        shape = (num_slots, self._shape_tail[0], capacity, self._shape_tail[1])
        self.keys = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self._allocate_importance(num_slots, capacity)

    def _allocate_importance(self, num_slots: int, capacity: int) -> None:
        shape = [num_slots, self.num_layers, self._shape_tail[0], capacity] if self.track_importance else [num_slots]
        self.importance = torch.zeros(shape, dtype=torch.float32, device=self._device)

    def enable_importance(self) -> None:
        """Record the attention each position receives (for KV pruning); call before any request runs."""
        self.track_importance = True
        self._allocate_importance(self.num_slots, self.capacity)

    def _grow(self, num_slots: int, capacity: int) -> None:
        old_keys, old_values, old_importance = self.keys, self.values, self.importance
        old_slots, old_capacity = self.num_slots, self.capacity
        self._allocate(num_slots, capacity)
        for new, old in zip(self.keys + self.values, old_keys + old_values, strict=True):
            new[:old_slots, :, :old_capacity].copy_(old)
        if self.track_importance:
            self.importance[:old_slots, :, :, :old_capacity].copy_(old_importance)

    def prune(self, request_id: str, keep: torch.Tensor, num_kv_tokens: int) -> None:
        """Compact the slot to the positions `keep` ([layers, kv_heads, K], ascending per head): each
        layer and head keeps its own positions, which become positions 0..K-1."""
        slot, num_keep = self._slot_of[request_id], keep.shape[-1]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            index = keep[layer][:, :, None].expand(-1, -1, keys.shape[-1])  # [KVH, K, D]
            keys[slot, :, :num_keep] = keys[slot].gather(1, index)  # the gather copies before the write
            values[slot, :, :num_keep] = values[slot].gather(1, index)
        self.importance[slot, :, :, :num_keep] = self.importance[slot].gather(-1, keep)
        self.importance[slot, :, :, num_keep:num_kv_tokens] = 0


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class BlockStore:
    """The prefix cache's KV tensors, by block id: one [2, layers, kv_heads, n, head_dim] each, n the
    block's tokens (block_size, or fewer for a partial block).

    Cached blocks live outside the slots so that memory follows the number of cached blocks (the
    budget's accounting), not slots x capacity. Applying a plan's `BlockCopy`s in order keeps a
    block id that is evicted and reused within one plan correct.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[int, torch.Tensor] = {}
        self._nbytes = 0  # kept as a count: /metrics reads it from another thread

    def __len__(self) -> int:
        return len(self._blocks)

    def save(self, kv: SlotKVCache, request_id: str, first_block: int, block_ids: tuple[int, ...],
             num_tokens: int) -> None:
        """Copy `num_tokens` positions of the slot, from block `first_block` on, into `block_ids`."""
        slot, size = kv.slot(request_id), self.block_size
        start = first_block * size
        keys = torch.stack([layer[slot, :, start : start + num_tokens] for layer in kv.keys])  # [L, KVH, T, D]
        values = torch.stack([layer[slot, :, start : start + num_tokens] for layer in kv.values])
        both = torch.stack([keys, values])  # [2, L, KVH, T, D]
        for index, block_id in enumerate(block_ids):
            self.drop((block_id,))
            block = self._blocks[block_id] = both[:, :, :, index * size : (index + 1) * size].clone()
            self._nbytes += block.numel() * block.element_size()

    def load(self, kv: SlotKVCache, request_id: str, block_ids: tuple[int, ...], num_tokens: int) -> None:
        """Write the blocks' first `num_tokens` positions, in order, as the first positions of
        `request_id`'s slot (created if new): the slot's copy is the request's own to write."""
        slot = kv.ensure(request_id, num_tokens)
        both = torch.cat([self._blocks[block_id] for block_id in block_ids], dim=3)  # [2, L, KVH, >= T, D]
        for layer, (keys, values) in enumerate(zip(kv.keys, kv.values, strict=True)):
            keys[slot, :, :num_tokens].copy_(both[0, layer, :, :num_tokens])
            values[slot, :, :num_tokens].copy_(both[1, layer, :, :num_tokens])

    def drop(self, block_ids: tuple[int, ...]) -> None:
        for block_id in block_ids:
            block = self._blocks.pop(block_id, None)
            if block is not None:
                self._nbytes -= block.numel() * block.element_size()

    def nbytes(self) -> int:
        return self._nbytes
