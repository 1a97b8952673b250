"""Training's layer stages with samples one per pass against several per pass, no server.

The same samples (48 tokens, 12 of them the answer, as one feedback sample of `make bench-learn`), on
the default model and the shipped LoRA: a micro-step's forward and backward, and a forward-only loss
pass (scoring, the publish gate), each with one sample per pass and with all of them in one
right-padded pass (train/layered.py). Each figure is the median of `--repeats` runs. Prints; never fails
on speed.

    .venv/bin/python benchmarks/train_passes.py [--dtype float32] [--samples 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mace.config import ModelConfig, TrainConfig
from mace.model.loader import load_model
from mace.train.layered import LayeredLoss, LayeredMicroStep
from mace.train.learner import Learner
from mace.train.replay import TrainSample

SAMPLE_TOKENS = 48
ANSWER_TOKENS = 12


def median_s(run: Callable[[], None], repeats: int) -> float:
    run()  # warm the allocator and the kernels' first-call paths
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bundle = load_model(ModelConfig(dtype=args.dtype), Path("~/.cache/mace").expanduser())
    learner = Learner(bundle.causal_lm, TrainConfig())
    causal_lm = bundle.causal_lm
    vocab = int(causal_lm.config.vocab_size)
    samples = [TrainSample(i + 1, [(31 + 97 * i + 13 * t) % vocab for t in range(SAMPLE_TOKENS)],
                           SAMPLE_TOKENS - ANSWER_TOKENS, 0.0) for i in range(args.samples)]
    tokens = sum(s.num_tokens for s in samples)

    def micro_step(max_pass_tokens: int) -> Callable[[], None]:
        def run() -> None:
            step = LayeredMicroStep(causal_lm, samples, len(samples), max_pass_tokens)
            while not step.is_done:
                step.run_next()
            learner.discard_gradients()
        return run

    def loss(groups: list[list[TrainSample]]) -> Callable[[], None]:
        def run() -> None:
            for group in groups:
                loss_pass = LayeredLoss(causal_lm, group, contextlib.nullcontext)
                while not loss_pass.is_done:
                    loss_pass.run_next()
        return run

    print(f"{bundle.dtype}, {torch.get_num_threads()} threads, {len(samples)} samples of {SAMPLE_TOKENS} tokens")
    print("| work | one sample per pass | all in one pass | ratio |")
    print("|---|---|---|---|")
    rows = [("micro-step (forward and backward)", micro_step(SAMPLE_TOKENS), micro_step(tokens)),
            ("loss pass (forward only)", loss([[s] for s in samples]), loss([samples]))]
    for name, alone, together in rows:
        alone_s, together_s = median_s(alone, args.repeats), median_s(together, args.repeats)
        print(f"| {name} | {tokens / alone_s:.0f} tok/s | {tokens / together_s:.0f} tok/s | "
              f"{alone_s / together_s:.2f}x |")


if __name__ == "__main__":
    main()
