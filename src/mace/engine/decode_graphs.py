"""Decode steps at fixed shapes, replayed as CUDA graphs: a small model's decode step on a GPU is
bound by Python and kernel launches, not by the device (20% utilisation, docs/results/gpu_coserve.md).

A step qualifies when every chunk is one decode token (prompt chunks and steps past the largest
bucket stay eager, as does KV pruning, which reads attention scores out of the step). Its rows are
padded up to a batch bucket, and its one-token attention reads a fixed view of the slot KV cache:
slots [0, bucket) and positions [0, length bucket). One graph per (batch bucket, length bucket):

- Inputs live in static buffers (token ids, positions, KV index, slots, slot lengths, and each row's
  adapter), written before each replay; the graph's output is a static hidden-state buffer. The LM
  head and sampling run outside the graph, on the real rows only.
- A padding row's KV write lands in a slot no request holds (`_pad_slot`), which no real row reads:
  its write is, in effect, skipped. So a bucket with padding needs a free slot below it.
- LoRA: the learner's layers compute the base model alone, and every row adds its own version's
  delta by a per-row gather from the stacked adapter slots (`RowRouting`), whose index is a graph
  input. A publish writes into those stacks, so it needs no recapture, and a mixed-version batch
  replays the same graph.
- A batch whose rows all run the base model (version 0) replays a graph captured without the
  LoRA deltas: a server that learns pays for adapters only in steps that serve one.
- Buckets are captured at start, the largest first, into one memory pool (the smaller graphs reuse
  the largest one's memory), as far as the KV cache's rows go then; larger ones on first use.
  Anything a graph baked in that later moves (the KV cache grown, the adapter slots re-stacked) makes
  every graph stale: they are dropped and recaptured on next use.

Without CUDA the same padded, static-shape forward runs eagerly (`capture=False`): that is how its
arithmetic is tested against the eager path on a CPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mace.model.multi_lora import RowRouting
from mace.train.learner import BASE

if TYPE_CHECKING:
    from mace.engine.runner import ModelRunner, _StepInputs

MIN_LENGTH_BUCKET = 256  # attended positions of the shortest graph: decode attention here costs little


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch` (at least one bucket holds it)."""
    buckets = [size for size in (1, 2, 4, 8) if size < max_batch]
    buckets += list(range(16, max_batch, 16))
    return sorted({*buckets, max_batch})


def length_bucket(length: int, capacity: int) -> int:
    bucket = MIN_LENGTH_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


@dataclass(frozen=True)
class GraphKey:
    batch: int
    length: int
    adapters: bool = False  # rows route through the stacked adapter versions (else: base model alone)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [batch, hidden]: the graph's output buffer


class StaticDecode:
    """Pure-decode steps padded to fixed shapes; replayed from CUDA graphs when `capture`."""

    def __init__(self, runner: ModelRunner, max_batch: int, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.buckets = batch_buckets(max_batch)
        device = runner.device
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.kv_index = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_lengths = torch.ones(size, dtype=torch.long, device=device)
        self.routing: RowRouting | None = None  # made with the learner's stacks (their device and dtype)
        self._graphs: dict[GraphKey, _Captured] = {}
        self._pool: Any = None
        self._baked: tuple[Any, ...] = ()  # what the captured graphs depend on
        self.num_steps = 0  # steps run through here (replayed, or padded eagerly)
        self.num_captures = 0

    # ---- which steps qualify ----

    def key_for(self, inputs: _StepInputs, adapter_names: list[str] | None = None) -> GraphKey | None:
        """The graph a step of `inputs` (rows on `adapter_names`, None: no learner) replays, or None
        when it must run eagerly."""
        kv = self.runner.kv
        if inputs.multis or not inputs.num_singles or kv.track_importance:
            return None
        rows, used = inputs.num_singles, kv.num_used_slots
        for batch in self.buckets:
            # The slot view covers every used slot; padding needs a free slot inside it.
            if batch >= used and (batch == rows or batch > used) and batch <= kv.num_slots:
                adapters = adapter_names is not None and any(name != BASE for name in adapter_names)
                return GraphKey(batch, length_bucket(inputs.attended_length, kv.capacity), adapters)
        return None

    # ---- running one ----

    def run(self, key: GraphKey, inputs: _StepInputs, adapter_names: list[str] | None) -> torch.Tensor:
        """The step's hidden states [rows, hidden] (rows as in `inputs`), through the graph `key_for`
        gave it."""
        self._fill(inputs, key, adapter_names)
        self.num_steps += 1
        if not self.capture:
            return self._forward(key)[: inputs.num_singles]
        self._drop_if_stale()
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key)
        captured.graph.replay()
        return captured.hidden[: inputs.num_singles]

    def _fill(self, inputs: _StepInputs, key: GraphKey, adapter_names: list[str] | None) -> None:
        rows, used = inputs.num_singles, self.runner.kv.num_used_slots
        self.input_ids[:rows].copy_(inputs.input_ids)
        self.positions[:rows].copy_(inputs.positions)
        self.kv_index[:rows].copy_(inputs.kv_index)
        self.slots[:rows].copy_(inputs.slots)
        self.slot_lengths[:used].copy_(inputs.slot_lengths)
        self._pad(rows, used, key.batch)
        learner = self.runner.trainer_learner()
        if learner is not None and adapter_names is not None and key.adapters:
            learner.fill_rows(adapter_names, self._routing_for_learner())

    def _pad(self, rows: int, used: int, batch: int) -> None:
        pad_slot = used  # held by no request (key_for keeps one inside the view)
        self.input_ids[rows:batch].zero_()
        self.positions[rows:batch].zero_()
        self.kv_index[rows:batch].zero_()
        self.slots[rows:batch].fill_(pad_slot)
        self.slot_lengths[used:batch].fill_(1)

    def _routing_for_learner(self) -> RowRouting:
        if self.routing is None:
            learner = self.runner.trainer_learner()
            assert learner is not None
            self.routing = learner.new_row_routing(self.buckets[-1])
        return self.routing

    def _inputs(self, key: GraphKey) -> _StepInputs:
        from mace.engine.runner import _StepInputs

        batch = key.batch
        return _StepInputs(
            input_ids=self.input_ids[:batch], positions=self.positions[:batch], kv_index=self.kv_index[:batch],
            slots=self.slots[:batch], singles=[], multis=[], single_slots=self.slots[:batch],
            slot_lengths=self.slot_lengths[:batch], num_singles=batch, attended_slots=batch,
            attended_length=key.length,
        )

    def _forward(self, key: GraphKey) -> torch.Tensor:
        with self._routed(key):
            return self.runner._forward(self._inputs(key))

    def _routed(self, key: GraphKey) -> AbstractContextManager[None]:
        learner = self.runner.trainer_learner()
        if learner is None:
            return nullcontext()
        if not key.adapters:
            return learner.serving([BASE])
        batch = key.batch
        routing = self._routing_for_learner()
        return learner.static_serving(RowRouting(routing.index[:batch], routing.scale[:batch]))

    # ---- capture ----

    def capture_all(self) -> None:
        """Capture the batch buckets the KV cache holds now, at the shortest length, the largest first
        (one memory pool). Larger buckets are captured on first use, once the cache has grown to hold
        them: reserving their rows now would multiply every later growth of the cache's length by the
        largest bucket (64 rows of a 2,048-token context are 3 GB on the default model)."""
        if not self.capture:
            return
        kv = self.runner.kv
        self._drop_if_stale()
        length = length_bucket(1, kv.capacity)
        variants = [False] if self.runner.trainer_learner() is None else [True, False]
        with torch.inference_mode(), self.runner.streams.inference():
            for adapters in variants:
                for batch in reversed([size for size in self.buckets if size <= kv.num_slots]):
                    key = GraphKey(batch, length, adapters)
                    if key not in self._graphs and kv.num_used_slots < batch:
                        self._pad(0, kv.num_used_slots, batch)
                        self._capture(key)

    def _capture(self, key: GraphKey) -> _Captured:
        # One eager run first: lazy initialisation (cuBLAS workspaces, autotuning) must not be captured.
        # Its KV writes are the replay's own (same buffers), so running it twice changes nothing.
        side = torch.cuda.Stream(self.runner.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            self._forward(key)
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self._forward(key)
        if self._pool is None:
            self._pool = graph.pool()
        captured = _Captured(graph, hidden)
        self._graphs[key] = captured
        self.num_captures += 1
        return captured

    def _drop_if_stale(self) -> None:
        learner = self.runner.trainer_learner()
        baked = (self.runner.kv.storage_key, None if learner is None else learner.stacks_generation)
        if baked != self._baked:
            self._graphs.clear()
            self._pool = None
            self._baked = baked

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
