"""The one memory budget: what learning needs is carved out of it, the rest is KV blocks.

    budget = adapter versions held + learner (weights, gradients, AdamW moments)   fixed
           + training micro-batch activations                                      reserved, shrinks first
           + KV blocks (running requests, then cached prefixes)                    the rest

The training reservation lives in the `BlockPool` as blocks, behind the prefix cache in the
reclaim order: when KV runs short, unused prefixes go first, then training shrinks (new micro-steps
get fewer tokens, down to none), and only then is a request preempted. It grows back from free
blocks when training plans its next micro-step. Activation bytes per token are an estimate from
the model's shapes (the tensors a Llama layer keeps for backward, plus the LM head's logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mace.config import MaceConfig, TrainConfig
from mace.engine.kv_blocks import BlockPool
from mace.engine.kv_pruning import KVPruner
from mace.engine.prefix_cache import PrefixCache
from mace.train.learner import lora_layers, num_slots, resident_tenants

TRAIN_OWNER = "<training>"
LOGITS_BYTES_PER_VOCAB = 8  # float32 logits and their gradient


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    adapters_bytes: int  # frozen adapter versions held for serving
    learner_bytes: int  # the learner's weights, gradients and optimizer moments
    training_bytes: int  # activations of the largest training micro-step
    training_bytes_per_token: int
    kv_block_bytes: int

    @property
    def num_blocks(self) -> int:
        """Blocks for KV and the training reservation together."""
        return max(0, self.budget_bytes - self.adapters_bytes - self.learner_bytes) // self.kv_block_bytes

    @property
    def num_training_blocks(self) -> int:
        return -(-self.training_bytes // self.kv_block_bytes)


def plan_memory(config: MaceConfig, causal_lm: Any, kv_bytes_per_token: int, budget_bytes: int) -> MemoryPlan:
    """Split `budget_bytes`; learning takes nothing when no retraining policy runs."""
    block_bytes = kv_bytes_per_token * config.memory.block_size
    if config.train.policy == "none":
        return MemoryPlan(budget_bytes, 0, 0, 0, 0, block_bytes)
    train = config.train
    adapter = _lora_bytes(causal_lm, train)
    per_token = _activation_bytes_per_token(causal_lm)
    max_tokens = max(train.chunk_tokens, train.idle_chunk_tokens, train.max_sample_tokens)
    return MemoryPlan(
        budget_bytes=budget_bytes,
        # The learner's frozen copies: the gate's candidate and every slot (the versions kept, the one
        # publishing, each resident tenant's active one: learner.num_slots).
        adapters_bytes=adapter * (num_slots(train) + 1),
        # The learner's weights, gradients and two AdamW moments, and each resident tenant's parked
        # weights and moments (train/lineage.py).
        learner_bytes=adapter * (4 + 3 * resident_tenants(train)),
        training_bytes=per_token * max_tokens,
        training_bytes_per_token=per_token,
        kv_block_bytes=block_bytes,
    )


def _lora_bytes(causal_lm: Any, train: TrainConfig) -> int:
    element_size: int = next(causal_lm.parameters()).element_size()
    layers = lora_layers(causal_lm.config.num_hidden_layers, train.lora_layer_fraction)
    total = 0
    for index in layers:
        for name, module in causal_lm.model.layers[index].named_modules():
            if name.rsplit(".", 1)[-1] in train.target_modules and hasattr(module, "in_features"):
                total += train.lora_rank * int(module.in_features + module.out_features)
    return total * element_size


def _activation_bytes_per_token(causal_lm: Any) -> int:
    config = causal_lm.config
    element_size: int = next(causal_lm.parameters()).element_size()
    # Per layer and token: the norms' inputs, q, k, v, attention output and residuals (~10 x hidden)
    # and the MLP's gate, up and their product (3 x intermediate).
    per_layer = 10 * int(config.hidden_size) + 3 * int(config.intermediate_size)
    num_layers: int = config.num_hidden_layers
    return element_size * num_layers * per_layer + LOGITS_BYTES_PER_VOCAB * int(config.vocab_size)


class TrainingReservation:
    """Blocks held for the training micro-batch's activations; the pool takes them back when KV is short."""

    def __init__(self, pool: BlockPool, plan: MemoryPlan) -> None:
        self.pool = pool
        self.target_blocks = min(plan.num_training_blocks, pool.num_blocks - 1)
        self.bytes_per_token = plan.training_bytes_per_token
        pool.shared_owners.add(TRAIN_OWNER)
        pool.reclaimers.append(self)
        self.refill()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks_owned_by(TRAIN_OWNER)

    @property
    def num_reclaimable_blocks(self) -> int:
        return self.num_blocks

    def reclaim(self, num_blocks: int) -> int:
        taken = self.pool.owners().get(TRAIN_OWNER, [])[:num_blocks]
        if taken:
            self.pool.free_blocks(TRAIN_OWNER, taken)
        return len(taken)

    def refill(self) -> None:
        """Grow back toward the full reservation from free blocks only (never at a request's cost)."""
        missing = min(self.target_blocks - self.num_blocks, self.pool.num_free_blocks)
        if missing > 0:
            self.pool.allocate(TRAIN_OWNER, missing, reclaim=False)

    def max_tokens(self) -> int:
        """Training tokens a new micro-step may take now (0: training waits for memory)."""
        self.refill()
        if self.bytes_per_token <= 0:
            return 0
        return self.num_blocks * self.pool.block_bytes // self.bytes_per_token


@dataclass
class Memory:
    """The engine's memory manager: the plan, the block pool and what holds blocks besides requests."""

    plan: MemoryPlan
    pool: BlockPool
    prefix_cache: PrefixCache | None
    training: TrainingReservation | None
    pruner: KVPruner | None

    @classmethod
    def build(cls, config: MaceConfig, causal_lm: Any, kv_bytes_per_token: int, device: torch.device) -> Memory:
        plan = plan_memory(config, causal_lm, kv_bytes_per_token, budget_bytes(config, device))
        pool = BlockPool(plan.num_blocks, config.memory.block_size, plan.kv_block_bytes)
        prefix_cache = PrefixCache(pool) if config.memory.prefix_caching else None
        training = TrainingReservation(pool, plan) if plan.training_bytes > 0 else None
        pruner = KVPruner(config.memory, pool) if config.memory.kv_pruning else None
        return cls(plan, pool, prefix_cache, training, pruner)


def budget_bytes(config: MaceConfig, device: torch.device) -> int:
    """`memory.budget_bytes`, or on CUDA with `memory.device_fraction` set, that share of the free memory."""
    fraction = config.memory.device_fraction
    if fraction > 0 and device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(free_bytes * fraction)
    return config.memory.budget_bytes
