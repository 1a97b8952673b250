"""Which GEMM layout the model's linear layers use for decode-sized batches on a CPU.

A decode step multiplies a few rows (one per running request) by every weight matrix of the model.
The same product can be asked of the BLAS two ways: `x @ W.T` (what `nn.Linear` runs) or `(W @ x.T).T`.
They are one result to rounding, but MKL picks other kernels for them: on a 2-core AVX2 CPU, the
second ran the default model's linears at 2-4 and 16-32 rows up to 1.8x faster with two threads, and
slower at 6-12 rows with one (docs/results/serving.md, "The GEMM layout of a decode step"). Which
wins depends on the CPU, the dtype, the row count and the thread count, so it is measured, not assumed:
`tune` times both on the model's own weights at load, for each thread count the engine runs its
forward with, and every `nn.Linear` of the model becomes a `LayoutLinear` that runs the faster one.
Inputs of three dimensions (training, `generate()`) keep `nn.Linear`'s own path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import structlog
import torch
import torch.nn.functional as F
from torch import nn

log = structlog.get_logger(__name__)

LinearLayout = Literal["auto", "standard", "transposed"]
MAX_ROWS = 32  # decode-sized: past this the standard layout's kernel is the efficient one
TRIED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # a row count between two takes the lower one's choice
MIN_GAIN = 0.9  # the transposed layout is taken where it runs in at most this share of the time
TUNING_BYTES = 64 << 20  # weights read per timed pass: past the caches, as a step reads them
REPEATS = 3  # the fastest of these passes counts (a shared machine's noise only ever adds)


@dataclass
class LayoutTable:
    """Per torch thread count, the row counts that run transposed."""

    transposed: dict[int, frozenset[int]] = field(default_factory=dict)

    def is_transposed(self, rows: int) -> bool:
        chosen = self.transposed.get(torch.get_num_threads())
        return chosen is not None and rows in chosen


class LayoutLinear(nn.Linear):
    """`nn.Linear` that runs a 2-D input of a decode-sized row count in the layout its table chose."""

    layout: LayoutTable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= MAX_ROWS and self.layout.is_transposed(x.shape[0]):
            out = torch.mm(self.weight, x.t()).t()
            if self.bias is not None:
                out = out + self.bias
            return out.contiguous()
        return F.linear(x, self.weight, self.bias)


def apply(causal_lm: Any, mode: LinearLayout, thread_counts: Iterable[int]) -> LayoutTable:
    """Make every `nn.Linear` of the model a `LayoutLinear` sharing one table, filled per `mode`."""
    linears = [module for module in causal_lm.modules() if type(module) is nn.Linear]
    table = LayoutTable()
    if mode == "transposed":
        table.transposed = {threads: frozenset(range(1, MAX_ROWS + 1)) for threads in thread_counts}
    elif mode == "auto":
        table.transposed = {threads: tune(linears, threads) for threads in sorted(set(thread_counts))}
        log.info("linear layout measured", transposed_rows={str(t): sorted(r) for t, r in table.transposed.items()})
    for linear in linears:
        linear.__class__ = LayoutLinear
        cast(LayoutLinear, linear).layout = table
    return table


@torch.inference_mode()
def tune(linears: list[nn.Linear], threads: int) -> frozenset[int]:
    """The row counts (up to MAX_ROWS) at which `(W @ x.T).T` beats `x @ W.T` on these weights, timed
    on `threads` torch threads with the fastest of REPEATS interleaved passes each."""
    weights = _sample(linears)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        faster = [rows for rows in TRIED_ROWS if _transposed_wins(weights, rows)]
    finally:
        torch.set_num_threads(before)
    return frozenset(rows for rows in range(1, MAX_ROWS + 1)
                     if max(r for r in TRIED_ROWS if r <= rows) in faster)


def _sample(linears: list[nn.Linear]) -> list[torch.Tensor]:
    """Weights in model order until TUNING_BYTES, so a pass reads memory as a step does."""
    chosen: list[torch.Tensor] = []
    total = 0
    for linear in linears:
        if total >= TUNING_BYTES:
            break
        chosen.append(linear.weight.detach())
        total += linear.weight.numel() * linear.weight.element_size()
    return chosen


def _transposed_wins(weights: list[torch.Tensor], rows: int) -> bool:
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    def standard() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def transposed() -> None:
        for w in weights:
            torch.mm(w, inputs[w.shape[1]].t()).t().contiguous()

    standard()  # first calls pay for allocations
    transposed()
    best = {"standard": float("inf"), "transposed": float("inf")}
    for _ in range(REPEATS):
        for name, run in (("standard", standard), ("transposed", transposed)):
            best[name] = min(best[name], _timed(run))
    return best["transposed"] <= MIN_GAIN * best["standard"]


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
