"""Physical KV storage: one slot (row) per running request, per layer.

    keys[layer], values[layer]: [num_slots, kv_heads, capacity, head_dim]

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
        return slot

    def release(self, request_id: str) -> None:
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return
        last = len(self._owner_of) - 1
        moved = self._owner_of.pop()
        if slot != last:
            for tensor in self.keys + self.values:
                tensor[slot].copy_(tensor[last])
            self._owner_of[slot] = moved
            self._slot_of[moved] = slot

    def _allocate(self, num_slots: int, capacity: int) -> None:
        shape = (num_slots, self._shape_tail[0], capacity, self._shape_tail[1])
        self.keys = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]

    def _grow(self, num_slots: int, capacity: int) -> None:
        old_keys, old_values = self.keys, self.values
        old_slots, old_capacity = self.num_slots, self.capacity
        self._allocate(num_slots, capacity)
        for new, old in zip(self.keys + self.values, old_keys + old_values, strict=True):
            new[:old_slots, :, :old_capacity].copy_(old)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
