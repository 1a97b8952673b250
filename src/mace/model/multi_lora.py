"""Many LoRA adapters in one forward: row i of a batch runs with its own adapter, in plain PyTorch.

Each LoRA-wrapped linear keeps the served adapters stacked: adapter k's A is rows [k*r, (k+1)*r) of
one [K*r, in] matrix and its B is columns [k*r, (k+1)*r) of one [out, K*r] matrix. The adapters'
own parameters are made views into these stacks, so writing a version's weights into its adapter
(a publish, a load) is already the stack's update: nothing to copy or keep in sync.

A mixed forward multiplies every row by the A of every adapter the step uses (one matmul against
the U used adapters' stacked A), masks each row down to its own adapter's r columns, and multiplies
by the stacked B (one matmul: the masked columns add nothing). That is U times a LoRA's arithmetic,
which at r = 8 is a few percent of the base linear's, in the same eight kernels whatever the mix.

Measured against the two textbook forms (benchmarks/multi_lora.py, docs/results/tenants.md), on the
default model's q_proj, one CPU thread: a per-row gather of A and B with two bmm is about as fast on
pure decode (60 us against 66 for 8 rows of 8 adapters) and over three times slower once a 256-token
prompt chunk rides along (it copies an adapter's A and B for every prompt token); adapters as
zero-padded segments with two bmm are slower in both. Most mixed steps under load carry a prompt
chunk, hence this form for eager steps. A decode step replayed as a CUDA graph
(engine/decode_graphs.py) needs shapes that do not depend on the mix, so it takes the per-row
gather (`RowRouting`): its index is a graph input, and it is the faster form on pure decode.

The LoRA runs in its weights' dtype (fp32, also under a bf16 model: peft keeps adapters in fp32) and
its output is added to the base output in fp32 before one rounding to the model's dtype, as peft
does for a batch with one adapter: a row computes the same in a mixed batch as alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    """Which adapter each row of the next forward uses; built once per forward, shared by every linear."""

    adapters: torch.Tensor  # [U] stack index of each adapter used (no base rows)
    mask: torch.Tensor  # [R, U, 1] one-hot: row i's adapter among the used ones; all zero for a base row


@dataclass(frozen=True)
class RowRouting:
    """Fixed-shape routing (a CUDA graph's input buffers): row i's adapter by stack index, scaled by 0
    for a base row (its index then names any adapter: it adds nothing)."""

    index: torch.Tensor  # [R] long
    scale: torch.Tensor  # [R, 1] in the adapters' dtype: 1 with an adapter, 0 for a base row


class StackedLora:
    """One LoRA-wrapped linear's served adapters, stacked (see the module docstring)."""

    def __init__(self, module: nn.Module, weights: Sequence[tuple[nn.Parameter, nn.Parameter]], scaling: float):
        """`weights`: each adapter's (A [r, in], B [out, r]); they become views into the stacks."""
        self.module = module  # whose output the adapters' contribution is added to
        self.scaling = scaling
        self.rank = weights[0][0].shape[0]
        with torch.inference_mode(False), torch.no_grad():  # stacks that training-side copies may write
            self.a = torch.cat([a.detach() for a, _ in weights], dim=0)  # [K*r, in]
            self.b = torch.cat([b.detach() for _, b in weights], dim=1)  # [out, K*r]
            for k, (a, b) in enumerate(weights):
                columns = slice(k * self.rank, (k + 1) * self.rank)
                a.data, b.data = self.a[columns], self.b[:, columns]

    def delta(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [R, ..., in] -> each row's LoRA output [R, ..., out], in the adapters' dtype."""
        num_used, rank = routing.adapters.numel(), self.rank
        out_features = self.b.shape[0]
        a = self.a.view(-1, rank, self.a.shape[1]).index_select(0, routing.adapters).view(num_used * rank, -1)
        b = self.b.view(out_features, -1, rank).index_select(1, routing.adapters).view(out_features, -1)
        down = F.linear(x.to(a.dtype), a)  # [R, ..., U*r]: every row under every used adapter
        mask = routing.mask.view(x.shape[0], *[1] * (x.dim() - 2), num_used, 1)
        kept = (down.view(*down.shape[:-1], num_used, rank) * mask).view(down.shape)
        return F.linear(kept, b) * self.scaling

    def row_delta(self, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """x: [R, in] -> [R, out]: each row through its own adapter's A and B, gathered per row."""
        rank, out_features = self.rank, self.b.shape[0]
        a = self.a.view(-1, rank, self.a.shape[1]).index_select(0, routing.index)  # [R, r, in]
        b = self.b.view(out_features, -1, rank).index_select(1, routing.index).transpose(0, 1)  # [R, out, r]
        down = torch.bmm(a, x.to(a.dtype)[:, :, None])  # [R, r, 1]
        return torch.bmm(b, down)[:, :, 0] * (routing.scale * self.scaling)


class MultiLora:
    """The stacked adapters of every LoRA-wrapped linear of a model, under the adapters' names."""

    def __init__(self, stacks: list[StackedLora], adapter_names: Sequence[str]) -> None:
        self.stacks = stacks
        self.index_of = {name: k for k, name in enumerate(adapter_names)}

    def routing(self, adapter_names: Sequence[str | None]) -> Routing:
        """Row i runs with `adapter_names[i]`; None is the base model (no adapter)."""
        indices = [None if name is None else self.index_of[name] for name in adapter_names]
        used = sorted({k for k in indices if k is not None})
        column = {k: j for j, k in enumerate(used)}
        stack = self.stacks[0]
        # A base row points at an extra column that is then dropped, leaving its mask row all zero.
        columns = torch.tensor([len(used) if k is None else column[k] for k in indices])
        mask = F.one_hot(columns, len(used) + 1)[:, : len(used), None].to(stack.a.device, stack.a.dtype)
        return Routing(adapters=torch.tensor(used, dtype=torch.long).to(stack.a.device), mask=mask)

    def fill_rows(self, adapter_names: Sequence[str | None], routing: RowRouting) -> None:
        """Write rows 0..n-1 of `routing` for `adapter_names` (None: the base model); rows past n
        (a graph's padding) become base rows."""
        indices = [0 if name is None else self.index_of[name] for name in adapter_names]
        scales = [0.0 if name is None else 1.0 for name in adapter_names]
        count = len(indices)
        routing.index[:count].copy_(torch.tensor(indices))
        routing.scale[:count, 0].copy_(torch.tensor(scales))
        routing.index[count:].zero_()
        routing.scale[count:].zero_()

    def new_row_routing(self, num_rows: int) -> RowRouting:
        stack = self.stacks[0]
        return RowRouting(index=torch.zeros(num_rows, dtype=torch.long, device=stack.a.device),
                          scale=torch.zeros(num_rows, 1, dtype=stack.a.dtype, device=stack.a.device))

    def rows_routed(self, routing: RowRouting) -> AbstractContextManager[None]:
        """Like `routed`, with a fixed-shape routing whose buffers may change between forwards (a CUDA
        graph captured within it replays with whatever the buffers then hold)."""
        return self._hooked(lambda stack, x: stack.row_delta(x, routing))

    @contextmanager
    def routed(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Within it, every stacked linear adds row i's adapter (`adapter_names[i]`) to its output.

        The wrapped linears must compute the base alone meanwhile (the caller disables their adapters).
        """
        routing = self.routing(adapter_names)
        if not routing.adapters.numel():  # base rows only: nothing to add
            yield
            return
        with self._hooked(lambda stack, x: stack.delta(x, routing)):
            yield

    @contextmanager
    def _hooked(self, delta: Callable[[StackedLora, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Every stacked linear adds `delta(stack, its input)` to its output, on this thread only: hooks
        belong to the module, so to every thread, and another thread's forward (training, on a CPU
        beside serving) passes through untouched."""
        owner = threading.get_ident()
        handles = [stack.module.register_forward_hook(partial(_add_delta, stack, delta, owner))
                   for stack in self.stacks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _add_delta(stack: StackedLora, delta: Callable[[StackedLora, torch.Tensor], torch.Tensor], owner: int,
               module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    if threading.get_ident() != owner:
        return None
    # Summed in fp32 (type promotion), rounded once to the base's dtype: peft's one-adapter arithmetic.
    return (output + delta(stack, args[0])).to(output.dtype)
