"""One decode step, no server: mace's runner against a bare transformers forward, and what inductor would gain.

Both run the same model in the same process on the same batch (prompts of 40 tokens prefilled, then
STEPS decode steps); each figure is the fastest step, which on a shared machine is the one least
disturbed by other processes. `--profile` prints torch.profiler's table for mace's steps (where the
time goes). `--compile` times the dense tail of every decoder layer (o_proj, residual, norm, MLP,
residual, next norm: everything but the attention over the KV cache and the LoRA-wrapped q/k/v
projections), eager against `torch.compile` (inductor, one graph shared by all layers, weights passed
as arguments), and the compile time per batch shape. `--loop` times the event loop's work per streamed
token (the engine's queue hand-off, incremental detokenizing, the SSE chunk's JSON) to set beside a
step's time. `--beside` times decode steps and training micro-steps (4 x 64 tokens, the shipped LoRA)
each alone on `--threads` cores, then together as the engine runs them on a CPU: training on a thread
of its own with half the cores, decode on the rest (its median step, and training's tokens/s). Prints;
never fails on speed.

    .venv/bin/python benchmarks/decode_step.py [--threads 1] [--dtype float32] [--batches 1,8,32]
        [--profile] [--compile] [--loop] [--beside]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mace.config import ModelConfig
from mace.engine.detokenizer import IncrementalDetokenizer
from mace.engine.plan import IterationPlan, ScheduledChunk
from mace.engine.request import Request, SamplingParams
from mace.engine.runner import ModelRunner
from mace.model.loader import ModelBundle, load_model

PROMPT_TOKENS = 40
STEPS = 24


def prompt(index: int) -> list[int]:
    return [(7 * index + 13 * position) % 49000 + 10 for position in range(PROMPT_TOKENS)]


def prefilled_stepper(runner: ModelRunner, versions: list[int], name: str = "r") -> Callable[[int], None]:
    """One request per entry of `versions` (its pinned adapter version), prefilled through `runner`;
    returns a function that runs one step of all of them (`num_tokens` each, 1: a decode step)."""
    requests = [Request(request_id=f"{name}-{i}", prompt_token_ids=prompt(i), eos_token_ids=frozenset(),
                        sampling_params=SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True),
                        max_model_len=2048, arrival_time_s=0.0, adapter_version=version)
                for i, version in enumerate(versions)]

    def step(num_tokens: int = 1) -> None:
        chunks = [ScheduledChunk.of(request, num_tokens) for request in requests]
        output = runner.run(IterationPlan(chunks=chunks))
        for chunk in chunks:
            chunk.request.num_computed_tokens = chunk.end_position
            chunk.request.append_output_token(output.sampled_token_ids[chunk.request.request_id])

    step(PROMPT_TOKENS)
    return step


def mace_step_s(bundle: ModelBundle, batch: int) -> tuple[float, Callable[[], None]]:
    """The fastest of STEPS decode steps through ModelRunner.run, and a function running one more."""
    step = prefilled_stepper(ModelRunner(bundle.causal_lm, 2048, bundle.device), [0] * batch)
    return fastest(step), step


@torch.inference_mode()
def bare_step_s(bundle: ModelBundle, batch: int) -> float:
    """The fastest of STEPS decode steps of the model's own forward on a DynamicCache."""
    model = bundle.causal_lm
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt(i) for i in range(batch)]), cache=cache, logits_to_keep=1)
    state = {"next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step() -> None:
        logits = model(input_ids=state["next"], cache=cache, logits_to_keep=1).logits
        state["next"] = logits[:, -1].argmax(-1, keepdim=True)

    return fastest(step)


def fastest(step: Callable[[], Any], repeats: int = STEPS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def dense_tails(bundle: ModelBundle) -> tuple[Callable[..., Any], list[tuple[torch.Tensor, ...]]]:
    """The per-layer tail as a function of its weights, and each layer's weights."""
    eps, low = float(bundle.causal_lm.config.rms_norm_eps), bundle.dtype
    layers = list(bundle.causal_lm.model.layers)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)

    def tail(hidden: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, post_w: torch.Tensor,
             gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
             next_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden + F.linear(attn, o_w)
        x = rms(hidden, post_w).to(low)
        hidden = hidden + F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
        return hidden, rms(hidden, next_w).to(low)

    weights = []
    for index, layer in enumerate(layers):
        following = layers[(index + 1) % len(layers)]
        weights.append((layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                        layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight,
                        following.input_layernorm.weight))
    return tail, weights


@torch.inference_mode()
def compare_compile(bundle: ModelBundle, batches: list[int]) -> None:
    tail, weights = dense_tails(bundle)
    compiled = torch.compile(tail, dynamic=False)
    hidden_size = int(bundle.causal_lm.config.hidden_size)

    def all_layers(fn: Callable[..., Any], batch: int) -> Callable[[], None]:
        first = torch.randn(batch, hidden_size)
        attn = torch.randn(batch, hidden_size).to(bundle.dtype)  # stands in for the attention's output

        def run() -> None:
            hidden = first
            for layer_weights in weights:
                hidden, _ = fn(hidden, attn, *layer_weights)

        return run

    for batch in batches:
        start = time.perf_counter()
        all_layers(compiled, batch)()
        compile_s = time.perf_counter() - start
        eager_s = fastest(all_layers(tail, batch), 15)
        compiled_s = fastest(all_layers(compiled, batch), 15)
        print(f"{bundle.dtype} batch {batch}: dense tails of all layers eager {eager_s * 1e3:.1f} ms, compiled "
              f"{compiled_s * 1e3:.1f} ms ({eager_s / compiled_s:.2f}x), first call (compiling) {compile_s:.1f} s",
              flush=True)


async def loop_s_per_token(tokenizer: Any, num_tokens: int = 512) -> float:
    """Per token: an asyncio.Queue hand-off, the detokenizer, and an SSE chunk as the server frames it."""
    text = "The quick brown fox jumps over the lazy dog, then runs into the forest to look for food. " * 40
    token_ids = tokenizer.encode(text)[:num_tokens]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    detokenizer, frames = IncrementalDetokenizer(tokenizer), []
    envelope = {"id": "req-0123456789abcdef", "object": "chat.completion.chunk", "created": 0,
                "model": "builtin:smollm2", "system_fingerprint": "mace-adapter-v0"}
    start = time.perf_counter()
    for token_id in token_ids:
        queue.put_nowait([token_id])
        delta = {"content": detokenizer.add(await queue.get())}
        choice = {"index": 0, "finish_reason": None, "logprobs": None, "delta": delta}
        frames.append(b"data: " + orjson.dumps({**envelope, "choices": [choice]}) + b"\n\n")
    return (time.perf_counter() - start) / len(token_ids)


def beside(bundle: ModelBundle, batches: list[int], seconds: float = 8.0) -> None:
    """Decode steps and training micro-steps, each alone on every core, then together as the engine runs
    them on a CPU: training on a thread of its own with half the cores, decode on the rest."""
    from mace.config import TrainConfig
    from mace.train.learner import Learner
    from mace.train.replay import TrainSample

    cores = torch.get_num_threads()
    learner = Learner(bundle.causal_lm, TrainConfig())
    vocab = int(bundle.causal_lm.config.vocab_size)
    samples = [TrainSample(i, [(31 + 97 * i + 13 * t) % vocab for t in range(64)], 48, 0.0) for i in range(4)]
    micro_step_for_warm_up = True
    for batch in batches:
        step = prefilled_stepper(ModelRunner(bundle.causal_lm, 2048, bundle.device), [0] * batch, name="beside")
        _beside_once(step, learner, samples, batch, cores, seconds, warm_up=micro_step_for_warm_up)
        micro_step_for_warm_up = False


def _beside_once(step: Callable[[int], None], learner: Any, samples: list[Any], batch: int, cores: int,
                 seconds: float, warm_up: bool) -> None:
    def micro_step() -> None:
        work = learner.micro_step(samples)
        while not work.is_done:
            work.run_next()
        learner.discard_gradients()

    def decode_ms() -> float:
        times = []
        for _ in range(STEPS):
            start = time.perf_counter()
            step(1)
            times.append(time.perf_counter() - start)
        return float(statistics.median(times)) * 1e3

    def train_tok_s(stop: Callable[[], bool]) -> float:
        start, done = time.perf_counter(), 0
        while not stop():
            micro_step()
            done += 1
        return done * sum(s.num_tokens for s in samples) / (time.perf_counter() - start)

    if warm_up:
        micro_step()
    alone_ms = decode_ms()
    until = time.perf_counter() + seconds
    alone_tok_s = train_tok_s(lambda: time.perf_counter() > until)
    finished = threading.Event()
    result: dict[str, float] = {}

    def train_beside() -> None:
        torch.set_num_threads(cores // 2)
        result["tok_s"] = train_tok_s(finished.is_set)

    trainer = threading.Thread(target=train_beside)
    trainer.start()
    torch.set_num_threads(cores - cores // 2)
    try:
        together_ms = decode_ms()
    finally:
        finished.set()
        trainer.join()
        torch.set_num_threads(cores)
    print(f"batch {batch}, {cores} cores: decode step {alone_ms:.1f} ms alone, {together_ms:.1f} ms with training "
          f"beside ({together_ms / alone_ms:.2f}x); training {alone_tok_s:.0f} tok/s alone, {result['tok_s']:.0f} "
          f"tok/s beside decode ({result['tok_s'] / alone_tok_s:.0%})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust to a shared machine)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--linear-layout", choices=["auto", "standard", "transposed"], default="auto",
                        help="the GEMM layout of mace's decode-sized batches (the bare forward keeps nn.Linear's)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of mace's decode steps")
    parser.add_argument("--compile", action="store_true", help="eager against inductor on the layers' dense tails")
    parser.add_argument("--loop", action="store_true", help="the event loop's work per streamed token")
    parser.add_argument("--beside", action="store_true", help="decode with training on its own thread beside it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Path(os.environ.get("MACE_CACHE_DIR", "~/.cache/mace")).expanduser()
    bundle = load_model(ModelConfig(dtype=args.dtype, device="cpu", linear_layout=args.linear_layout), cache_dir)
    batches = [int(b) for b in args.batches.split(",")]
    if args.compile:
        compare_compile(bundle, batches)
        return
    if args.beside:
        beside(bundle, batches)
        return
    if args.loop:
        best_s = min(asyncio.run(loop_s_per_token(bundle.tokenizer)) for _ in range(5))
        print(f"event loop work per streamed token: {best_s * 1e6:.0f} us")
        return
    for batch in batches:
        bare_s = bare_step_s(bundle, batch)
        mace_s, step = mace_step_s(bundle, batch)
        bare_s = min(bare_s, bare_step_s(bundle, batch))  # before and after: the machine may have changed
        print(f"{args.dtype} batch {batch}: mace {mace_s * 1e3:.1f} ms, bare forward {bare_s * 1e3:.1f} ms "
              f"({mace_s / bare_s:.2f}x)", flush=True)
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for _ in range(5):
                    step()
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
