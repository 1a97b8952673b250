"""Executes an IterationPlan on a Llama-architecture model: one flat, batched forward pass.

All tokens of the step (decode tokens and prefill chunks of any length) run through the linear
layers together as one [num_tokens, hidden] batch; only attention is split: single-token chunks
attend together over the slot KV cache, longer chunks attend one request at a time. The model's
own modules are called (LoRA layers included), so adapters apply as in `model.forward`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mace.engine.decode_graphs import StaticDecode
from mace.engine.kv_cache import BlockStore, SlotKVCache
from mace.engine.plan import BlockCopy, IterationPlan, KVPrune, RunnerOutput, ScheduledChunk
from mace.engine.sampler import Sampler
from mace.engine.streams import StreamManager
from mace.train.learner import Learner
from mace.train.trainer import Trainer

SNAP_WINDOW = 16  # last queries of a chunk whose attention scores tokens for KV pruning
RESCORED_LOGITS = 16  # low-precision logits recomputed in fp32, from the largest: all near-ties of the top one
POOL_KERNEL = 7  # neighbours whose scores a token shares when pruning (odd: the output keeps its length)


@dataclass(frozen=True)
class _StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] token positions (rotary)
    kv_index: torch.Tensor  # [T] where each token's KV goes in its slot: its position less the pruned tokens
    slots: torch.Tensor  # [T] slot of each token's request
    singles: list[ScheduledChunk]  # one-token chunks, laid out first
    multis: list[ScheduledChunk]  # longer chunks, after the singles
    single_slots: torch.Tensor  # [num_singles]
    slot_lengths: torch.Tensor  # [attended_slots] attended length of each slot (1 if unused this step)
    num_singles: int  # one-token rows, first in the flat batch (a padded decode step counts its padding)
    attended_slots: int  # one-token attention reads KV slots [0, attended_slots) ...
    attended_length: int  # ... and positions [0, attended_length) of each


@dataclass(frozen=True)
class _Logits:
    values: torch.Tensor  # [S, vocab] float32
    chunks: list[ScheduledChunk]  # the chunk each row samples for


class ModelRunner:
    def __init__(
        self, causal_lm: Any, max_model_len: int, device: torch.device, overlap_streams: bool = True,
        kv_block_size: int = 16, train_thread: bool = False, num_threads: int = 0,
        cuda_graphs: bool = False, max_num_seqs: int = 64,
    ) -> None:
        # Any: Hugging Face modules expose their submodules as dynamic attributes.
        decoder: Any = causal_lm.model
        config = causal_lm.config
        self.causal_lm = causal_lm
        self.decoder = decoder
        self.device = device
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling: float = self.head_dim**-0.5
        dtype = next(causal_lm.parameters()).dtype
        self.compute_dtype = dtype
        with torch.inference_mode():
            self.kv = SlotKVCache(
                len(decoder.layers), self.num_kv_heads, self.head_dim, max_model_len, dtype, device
            )
        self.block_store = BlockStore(kv_block_size)
        self.sampler = Sampler()
        self.streams = StreamManager(device, overlap=overlap_streams, train_thread=train_thread,
                                     num_threads=num_threads)
        self.trainer: Trainer | None = None  # set when a retraining policy is on
        # Pure-decode steps replayed as CUDA graphs (decode_graphs.py); None: every step eager.
        self.static_decode: StaticDecode | None = (
            StaticDecode(self, max_num_seqs, capture=True) if cuda_graphs and device.type == "cuda" else None)

    def trainer_learner(self) -> Learner | None:
        return None if self.trainer is None else self.trainer.learner

    def kv_bytes_per_token(self) -> int:
        element_size = self.kv.keys[0].element_size()
        return 2 * self.kv.num_layers * self.num_kv_heads * self.head_dim * element_size

    def release(self, request_ids: list[str]) -> None:
        with torch.inference_mode():
            for request_id in request_ids:
                self.kv.release(request_id)
                self.sampler.release(request_id)

    def run(self, plan: IterationPlan) -> RunnerOutput:
        self.streams.claim_cores()
        self.release(self._copy_blocks(plan.kv_copies, plan.released_request_ids))
        if plan.kv_prunes:
            with self.streams.inference(), torch.inference_mode():
                self._prune(plan.kv_prunes)
        if plan.is_empty:
            return RunnerOutput(sampled_token_ids={}, forward_time_s=0.0)
        start = time.perf_counter()
        # Launch order matters on CUDA: inference, then training, then wait for the inference
        # stream alone, so training kernels overlap decode and the sampled tokens come back first.
        # On a CPU the training stages run on their own thread meanwhile (streams.py).
        logits: _Logits | None = None
        trainer, work = self.trainer, plan.train
        with self.streams.beside(None if trainer is None or work is None else lambda: trainer.run_work(work),
                                 has_body=bool(plan.chunks)):
            if plan.chunks:
                with self.streams.inference(), torch.inference_mode():
                    inputs = self._prepare(plan)
                    logits = self._logits(inputs, self._hidden(inputs))
        sampled: dict[str, int] = {}
        if logits is not None:
            with self.streams.inference(), torch.inference_mode():
                sampled = self._sample(logits)
        return RunnerOutput(sampled_token_ids=sampled, forward_time_s=time.perf_counter() - start)

    def _copy_blocks(self, copies: list[BlockCopy], released: list[str]) -> list[str]:
        """Prefix cache traffic, in the order the scheduler logged it, before `released` drop their rows
        (a finished request's save reads its row); returns the ids still to release.

        A load for an id that is also released is a new request reusing a finished one's id: the old
        row goes first, so the load lands in the new request's row."""
        pending = list(released)
        if not copies:
            return pending
        with self.streams.inference(), torch.inference_mode():
            for copy in copies:
                if copy.kind == "save":
                    self.block_store.save(self.kv, copy.request_id, copy.first_block, copy.block_ids,
                                          copy.num_tokens)
                elif copy.kind == "load":
                    if copy.request_id in pending:
                        pending.remove(copy.request_id)
                        self.release([copy.request_id])
                    self.block_store.load(self.kv, copy.request_id, copy.block_ids, copy.num_tokens)
                else:
                    self.block_store.drop(copy.block_ids)
        return pending

    def _hidden(self, inputs: _StepInputs) -> torch.Tensor:
        """The step's final hidden states: replayed from a decode graph when the step has one."""
        names = self._adapter_names(inputs) if self.trainer is not None else None
        static = self.static_decode
        key = static.key_for(inputs, names) if static is not None else None
        if static is not None and key is not None:
            return static.run(key, inputs, names)
        return self._serve_forward(inputs, names)

    def _adapter_names(self, inputs: _StepInputs) -> list[str]:
        assert self.trainer is not None
        learner = self.trainer.learner
        return [learner.adapter_for(chunk.request.adapter_version, chunk.request.tenant)
                for chunk in inputs.singles + inputs.multis for _ in range(chunk.num_new_tokens)]

    def _serve_forward(self, inputs: _StepInputs, adapter_names: list[str] | None) -> torch.Tensor:
        """Each token runs with its request's pinned adapter version (mixed versions in one batch)."""
        if self.trainer is None or adapter_names is None:
            return self._forward(inputs)
        with self.trainer.learner.serving(adapter_names):
            return self._forward(inputs)

    def _prepare(self, plan: IterationPlan) -> _StepInputs:
        singles = [chunk for chunk in plan.chunks if chunk.num_new_tokens == 1]
        multis = [chunk for chunk in plan.chunks if chunk.num_new_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        kv_index: list[int] = []
        slots: list[int] = []
        for chunk in singles + multis:
            shift = chunk.request.num_pruned_tokens
            slot = self.kv.ensure(chunk.request.request_id, chunk.end_position - shift)
            ids.extend(chunk.request.token_ids_slice(chunk.start_position, chunk.end_position))
            positions.extend(range(chunk.start_position, chunk.end_position))
            kv_index.extend(range(chunk.start_position - shift, chunk.end_position - shift))
            slots.extend([slot] * chunk.num_new_tokens)
        single_slots = [self.kv.slot(chunk.request.request_id) for chunk in singles]
        lengths = [1] * self.kv.num_used_slots
        for chunk, slot in zip(singles, single_slots, strict=True):
            lengths[slot] = chunk.end_position - chunk.request.num_pruned_tokens
        return _StepInputs(
            input_ids=self._long(ids),
            positions=self._long(positions),
            kv_index=self._long(kv_index),
            slots=self._long(slots),
            singles=singles,
            multis=multis,
            single_slots=self._long(single_slots),
            slot_lengths=self._long(lengths),
            num_singles=len(singles),
            attended_slots=self.kv.num_used_slots,
            attended_length=max(lengths[slot] for slot in single_slots) if singles else 0,
        )

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _forward(self, inputs: _StepInputs) -> torch.Tensor:
        decoder, low = self.decoder, self.compute_dtype
        # The residual stream stays fp32 whatever the weights' dtype: summed over every layer in bf16,
        # its rounding changed a greedy token in 15% of answer positions on the default model.
        hidden = decoder.embed_tokens(inputs.input_ids).float()  # [T, hidden]
        cos, sin = decoder.rotary_emb(hidden, inputs.positions[None])  # [1, T, head_dim] each
        cos, sin = cos.to(low), sin.to(low)
        for layer_index, layer in enumerate(decoder.layers):
            x = layer.input_layernorm(hidden).to(low)
            hidden = hidden + layer.self_attn.o_proj(self._attention(layer.self_attn, x, cos, sin, layer_index, inputs))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden).to(low))
        normed: torch.Tensor = decoder.norm(hidden).to(low)
        return normed

    def _attention(
        self,
        attn: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_index: int,
        inputs: _StepInputs,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = attn.q_proj(x).view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)[None]
        k = attn.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)[None]
        v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # q: [1, H, T, D], k: [1, KVH, T, D]
        keys, values = self.kv.keys[layer_index], self.kv.values[layer_index]
        keys[inputs.slots, :, inputs.kv_index] = k[0].transpose(0, 1)
        values[inputs.slots, :, inputs.kv_index] = v
        queries = q[0].transpose(0, 1)  # [T, H, D]
        out = torch.empty_like(queries)
        num_singles = inputs.num_singles
        if num_singles:
            out[:num_singles] = self._single_token_attention(queries[:num_singles], keys, values, inputs, layer_index)
        offset = num_singles
        for chunk in inputs.multis:
            span = slice(offset, offset + chunk.num_new_tokens)
            out[span] = self._chunk_attention(queries[span], keys, values, chunk, layer_index)
            offset += chunk.num_new_tokens
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _single_token_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inputs: _StepInputs, layer_index: int
    ) -> torch.Tensor:
        """queries: [S, H, D] for S one-token chunks -> [S, H, D], reading all used slots as one view."""
        num_slots, length = inputs.attended_slots, inputs.attended_length
        group = self.num_heads // self.num_kv_heads
        slot_queries = queries.new_zeros(num_slots, self.num_kv_heads, group, self.head_dim)
        slot_queries[inputs.single_slots] = queries.view(-1, self.num_kv_heads, group, self.head_dim)
        k = keys[:num_slots, :, :length]  # [N, KVH, L, D], a view
        v = values[:num_slots, :, :length]
        scores = torch.matmul(slot_queries, k.transpose(-1, -2)) * self.scaling  # [N, KVH, G, L]
        visible = torch.arange(length, device=self.device)[None, :] < inputs.slot_lengths[:, None]  # [N, L]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1)
        if self.kv.track_importance:  # H2O: attention received, per layer and KV head
            self.kv.importance[inputs.single_slots, layer_index, :, :length] += probs[inputs.single_slots].sum(dim=2)
        probs = probs.to(v.dtype)
        out = torch.matmul(probs, v)  # [N, KVH, G, D]
        return out[inputs.single_slots].view(-1, self.num_heads, self.head_dim)

    def _chunk_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: ScheduledChunk, layer_index: int
    ) -> torch.Tensor:
        """queries: [C, H, D] of one request's chunk -> [C, H, D], causal over its cached prefix."""
        shift = chunk.request.num_pruned_tokens
        slot = self.kv.slot(chunk.request.request_id)
        start, end = chunk.start_position - shift, chunk.end_position - shift  # in the slot, after pruning
        q = queries.transpose(0, 1)[None]  # [1, H, C, D]
        k = keys[slot : slot + 1, :, :end]  # [1, KVH, end, D]
        v = values[slot : slot + 1, :, :end]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
        else:
            rows = torch.arange(start, end, device=self.device)[:, None]
            mask = torch.arange(end, device=self.device)[None, :] <= rows  # [C, end]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        if self.kv.track_importance:
            self._observe_window(q, k, slot, end, layer_index)
        return out[0].transpose(0, 1)

    def _observe_window(self, q: torch.Tensor, k: torch.Tensor, slot: int, end: int, layer_index: int) -> None:
        """SnapKV: what the chunk's last queries attend to, so a prompt pruned right after prefill keeps it."""
        window = min(SNAP_WINDOW, q.shape[2])
        group = self.num_heads // self.num_kv_heads
        last = q[0, :, -window:].reshape(self.num_kv_heads, group, window, self.head_dim)  # [KVH, G, W, D]
        scores = torch.matmul(last, k[0].transpose(-1, -2)[:, None]) * self.scaling  # [KVH, G, W, end]
        rows = torch.arange(end - window, end, device=self.device)[:, None]
        visible = torch.arange(end, device=self.device)[None, :] <= rows  # [W, end]
        probs = scores.masked_fill(~visible, float("-inf")).float().softmax(dim=-1)
        self.kv.importance[slot, layer_index, :, :end] += probs.sum(dim=(1, 2))

    def _prune(self, prunes: list[KVPrune]) -> None:
        """Keep sinks, the recent window and, per layer and KV head, the most attended middle positions."""
        for prune in prunes:
            if not self.kv.has(prune.request_id):
                continue  # preempted in the same plan
            slot, num_kv = self.kv.slot(prune.request_id), prune.num_kv_tokens
            num_middle = prune.keep_tokens - prune.num_sink - prune.num_recent
            scores = self.kv.importance[slot, :, :, prune.num_sink : num_kv - prune.num_recent]  # [L, KVH, M]
            # SnapKV's pooling: a token's neighbours count too, so kept spans stay contiguous.
            pooled = F.avg_pool1d(scores.flatten(0, 1)[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
            chosen = pooled[:, 0].topk(num_middle).indices.sort().values.view(*scores.shape[:2], -1) + prune.num_sink
            fixed = (torch.arange(prune.num_sink, device=self.device),
                     torch.arange(num_kv - prune.num_recent, num_kv, device=self.device))
            keep = torch.cat([fixed[0].expand(*scores.shape[:2], -1), chosen,
                              fixed[1].expand(*scores.shape[:2], -1)], dim=-1)  # [L, KVH, K] per layer and head
            self.kv.prune(prune.request_id, keep, num_kv)

    def _logits(self, inputs: _StepInputs, hidden: torch.Tensor) -> _Logits | None:
        """The LM head on the last position of each chunk that samples a token."""
        rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        offset = 0
        for chunk in inputs.singles + inputs.multis:
            offset += chunk.num_new_tokens
            if chunk.samples_token:
                rows.append(offset - 1)
                sampling.append(chunk)
        if not rows:
            return None
        last = hidden[torch.tensor(rows, device=self.device)]  # [S, hidden]
        lm_head = self.causal_lm.lm_head
        logits = lm_head(last).float()  # [S, vocab]
        if self.compute_dtype != torch.float32 and isinstance(lm_head, torch.nn.Linear):
            logits = self._rescore_top(logits, last, lm_head.weight)
        return _Logits(logits, sampling)

    @staticmethod
    def _rescore_top(logits: torch.Tensor, last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Low-precision logits are rounded to 8 bits of mantissa (steps of 0.125 near 20), which turned
        near-ties into changed greedy tokens; the top candidates are recomputed with an fp32 output."""
        top = logits.topk(RESCORED_LOGITS, dim=-1).indices  # [S, K]
        exact = torch.einsum("skh,sh->sk", weight[top].float(), last.float())  # [S, K]
        return logits.scatter_(1, top, exact)

    def _sample(self, logits: _Logits) -> dict[str, int]:
        request_ids = [chunk.request.request_id for chunk in logits.chunks]
        params = [chunk.request.sampling_params for chunk in logits.chunks]
        tokens = self.sampler.sample(logits.values, request_ids, params)
        return dict(zip(request_ids, tokens, strict=True))
