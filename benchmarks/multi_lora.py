"""Mixed-tenant decode: a step at batch 8 with 8 different adapter versions against one shared version and none.

Each dtype's model is loaded once, with a Learner holding 8 published versions of random weights
(their values do not matter to the time), and one ModelRunner per case decodes its own 8 requests
after a 40-token prefill. The cases' steps are interleaved, round by round, so that a load change on
a shared machine hits all of them alike; each figure is the fastest of --steps. The cases:
- no adapter: every row on version 0 (peft's LoRA layers switched off);
- one shared adapter: every row on version 1 (peft's one-adapter forward);
- 8 adapters: rows on versions 1..8, through MultiLora (model/multi_lora.py), which serving uses;
- 8 adapters, peft: the same rows through peft's mixed-batch forward (its loop over adapters), what
  serving used before.

Then the op alone, on layer 0's q_proj stacks: MultiLora's masked form against a per-row gather of A/B
with two bmm and against zero-padded per-adapter segments with two bmm, on 8 decode rows of 8
adapters, and on the same rows beside a 256-token prompt chunk of one adapter. Prints markdown;
never fails on speed.

    .venv/bin/python benchmarks/multi_lora.py [--steps 30] [--dtypes float32,auto] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch

from decode_step import prefilled_stepper
from mace.config import ModelConfig, TrainConfig
from mace.engine.runner import ModelRunner
from mace.model.loader import load_model
from mace.model.multi_lora import MultiLora, StackedLora
from mace.train.learner import Learner

BATCH = 8
CASES = {"no adapter": [0] * BATCH, "one shared adapter": [1] * BATCH,
         "8 adapters (MultiLora)": list(range(1, BATCH + 1)), "8 adapters (peft's loop)": list(range(1, BATCH + 1))}


class _PeftMixed:
    """The learner as the runner sees it, with peft's mixed-batch forward in place of MultiLora."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.adapter_for = learner.adapter_for

    def serving(self, adapter_names: list[str]) -> AbstractContextManager[None]:
        hooks = self.learner.peft_model.base_model._enable_peft_forward_hooks
        return cast(AbstractContextManager[None], hooks(adapter_names=adapter_names))


def fastest_interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def publish_versions(learner: Learner, num_versions: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for version in range(1, num_versions + 1):
        with torch.no_grad():
            for param in learner._learner_params():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        learner.publish(version)


def step_table(dtype: str, cache_dir: Path, rounds: int) -> tuple[list[str], StackedLora]:
    bundle = load_model(ModelConfig(dtype=dtype, device="cpu"), cache_dir)
    learner = Learner(bundle.causal_lm, TrainConfig(max_versions_loaded=BATCH))
    publish_versions(learner, BATCH)
    steps = {}
    for name, versions in CASES.items():
        runner = ModelRunner(bundle.causal_lm, 2048, bundle.device)
        serving = _PeftMixed(learner) if "peft" in name else learner
        runner.trainer = cast(Any, SimpleNamespace(learner=serving))
        steps[name] = prefilled_stepper(runner, versions, name)
    best = fastest_interleaved(steps, rounds)
    shared = best["one shared adapter"]
    label = f"{dtype} ({str(bundle.dtype).removeprefix('torch.')})"
    rows = [f"| {label} | {name} | {seconds * 1e3:.1f} | {seconds / shared:.2f}x |" for name, seconds in best.items()]
    return rows, learner._multi.stacks[0]


def gather_bmm(stack: StackedLora, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per row: gather its adapter's A [r, in] and B [out, r], then two batched matmuls."""
    rank = stack.rank

    def apply(x: torch.Tensor) -> torch.Tensor:
        a = stack.a.view(-1, rank, stack.a.shape[1]).index_select(0, rows)  # [T, r, in]
        b = stack.b.view(stack.b.shape[0], -1, rank).index_select(1, rows)  # [out, T, r]
        down = torch.bmm(x[:, None], a.transpose(1, 2))  # [T, 1, r]
        return torch.bmm(down, b.permute(1, 2, 0))[:, 0] * stack.scaling

    return apply


def padded_segments(stack: StackedLora, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows sorted into one zero-padded segment per adapter, two bmm over the segments, then unsorted."""
    used, inverse = torch.unique(rows, return_inverse=True)  # once per step, like MultiLora's routing
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse)
    segment = inverse[order]
    position = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[segment]
    rank, length = stack.rank, int(counts.max())

    def apply(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(used.numel(), length, x.shape[1])
        padded[segment, position] = x[order]
        a = stack.a.view(-1, rank, stack.a.shape[1]).index_select(0, used)  # [U, r, in]
        b = stack.b.view(stack.b.shape[0], -1, rank).index_select(1, used).permute(1, 2, 0)  # [U, r, out]
        out = torch.bmm(torch.bmm(padded, a.transpose(1, 2)), b)  # [U, L, out]
        result = x.new_empty(rows.numel(), out.shape[-1])
        result[order] = out[segment, position]
        return result * stack.scaling

    return apply


def masked(stack: StackedLora, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    routing = MultiLora([stack], [str(k) for k in range(stack.a.shape[0] // stack.rank)]).routing(
        [str(k) for k in rows.tolist()])
    return lambda x: stack.delta(x, routing)


def op_rows(stack: StackedLora, repeats: int = 300) -> Iterator[str]:
    decodes = torch.arange(BATCH)
    shapes = {"8 decode rows, 8 adapters": decodes,
              "the same + a 256-token chunk": torch.cat([decodes, torch.full((256,), 3)])}
    forms = {"MultiLora (masked)": masked, "gather + bmm": gather_bmm, "padded segments + bmm": padded_segments}
    for shape, rows in shapes.items():
        x = torch.randn(rows.numel(), stack.a.shape[1])
        reference = gather_bmm(stack, rows)(x)
        for form, prepare in forms.items():
            apply = prepare(stack, rows)  # per-step work, shared by every linear: not timed
            torch.testing.assert_close(apply(x), reference, atol=1e-4, rtol=1e-4)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                apply(x)
                best = min(best, time.perf_counter() - start)
            yield f"| {shape} | {form} | {best * 1e6:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtypes", default="float32,auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Path(os.environ.get("MACE_CACHE_DIR", "~/.cache/mace")).expanduser()
    print(f"decode step, batch {BATCH}, fastest of {args.steps}, {args.threads} thread(s)\n")
    print("| dtype | adapters | step ms | / shared |\n|---|---|---|---|")
    stack = None
    for dtype in args.dtypes.split(","):
        rows, stack = step_table(dtype, cache_dir, args.steps)
        print("\n".join(rows), flush=True)
    if stack is not None:
        print(f"\nthe LoRA op alone, layer 0 q_proj ({stack.a.shape[1]} -> {stack.b.shape[0]}, r = {stack.rank}, "
              f"{stack.a.dtype}), fastest of 300\n")
        print("| rows | form | us |\n|---|---|---|")
        with torch.inference_mode():
            print("\n".join(op_rows(stack)))


if __name__ == "__main__":
    main()
