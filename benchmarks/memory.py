"""The memory manager's figures, in process (no HTTP), on the default model. Prints; passes nothing.

1. Prefix sharing: p50 time to first token when 90% of each prompt is a shared ~700-token system
   prompt, with the prefix cache on and off (requests one at a time, so TTFT is the prefill alone).
   1b. The same prompts submitted all at once on a cold cache.
   1c. 1 and 1b with transformers' own continuous batching, for reference.
   1d. Sharing to the token: a ~1,000-token system prompt and a short user question in SmolLM2's
       chat template, one at a time: cold, whole blocks shared, and every shared token (the cached
       block where the prompts part lent in part), with where the warm TTFT goes.
2. KV pruning at a fixed memory budget: how many sequences run at once and decode tokens/s, with
   pruning to 50% of each sequence's KV against no pruning.
3. Pruning's quality cost: perplexity of a held-out continuation of long prompts with the KV pruned
   to 100/50/20% of the prompt (benchmarks/_pruning_quality.py).

    make bench-memory
    python benchmarks/memory.py --model builtin:tiny --parts ttft   # quick look
    python benchmarks/memory.py --parts exact                       # part 1d alone
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import PROMPTS
from _pruning_quality import print_quality_table
from mace.config import MaceConfig, load_config
from mace.engine.frontend import AsyncEngine
from mace.engine.request import SamplingParams
from mace.model.loader import ModelBundle, load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mace-engine")
SYSTEM_TOKENS = 700
USER_TOKENS = 78  # 10% of each prompt
EXACT_SYSTEM_TOKENS = 1000  # part 1d
BLOCK_SIZE = 16  # the default memory.block_size
GUIDELINES = (
    "You are a careful, friendly assistant for a public library. Answer questions about opening hours, "
    "membership, borrowing rules, fines, events, study rooms, printing and the digital catalogue. Keep "
    "answers short and concrete, quote the relevant rule when there is one, and say so plainly when you "
    "do not know. Never invent a policy. Members may borrow up to twelve items for three weeks, renew "
    "twice online unless someone has reserved the item, and pay no fines on children's books. Study rooms "
    "are booked for two hours at a time, at most a week ahead. Printing costs ten cents a page in black "
    "and white and fifty cents in colour. Events are free but some need a ticket from the front desk. "
)


def make_config(args: argparse.Namespace, budget_mib: int, tpot_s: float = 0.35, **memory: Any) -> MaceConfig:
    return load_config(ROOT / "configs" / "default.toml", {
        "model": {"name": args.model, "max_model_len": 2048},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 1024},
        "memory": {"budget_bytes": budget_mib * 1024**2, **memory},
        "train": {"policy": "none"},
        "slo": {"tpot_s": tpot_s},
        "data_dir": tempfile.mkdtemp(prefix="mace-bench-memory-"),
    }, environ={})


def shared_prompts(bundle: ModelBundle, num_requests: int) -> tuple[list[int], list[list[int]]]:
    """A ~700-token system prompt and `num_requests` distinct user turns of ~78 tokens after it."""
    tokenizer = bundle.tokenizer
    system = tokenizer.encode(GUIDELINES * 8, add_special_tokens=False)[:SYSTEM_TOKENS]
    users = []
    for index in range(num_requests):
        text = f"Visitor {index} asks: " + " ".join(PROMPTS[(index + k) % len(PROMPTS)] for k in range(8))
        users.append(system + tokenizer.encode(text, add_special_tokens=False)[:USER_TOKENS])
    return system, users


async def time_to_first_token(engine: AsyncEngine, ids: list[int]) -> float:
    started = time.perf_counter()
    async for delta in engine.generate(ids, SamplingParams(max_tokens=1, temperature=0)):
        if delta.new_token_ids:
            return time.perf_counter() - started
    raise RuntimeError("no token")


@dataclass(frozen=True)
class TtftRun:
    ttfts: list[float]  # sorted
    num_cached_tokens: int  # prompt tokens found in the prefix cache, the warm-up's included
    step_s: float  # engine steps while the measured requests ran, all of them (planning, KV loads, forward)
    forward_s: float  # of which the forward passes


async def measure_ttfts(args: argparse.Namespace, bundle: ModelBundle, sharing: bool, warm_up: list[int],
                        prompts: list[list[int]], at_once: bool, to_the_token: bool = True) -> TtftRun:
    """TTFTs of `prompts` on a new engine after one warm-up request (which also caches its prompt)."""
    engine = AsyncEngine(bundle, make_config(args, 1024, prefix_caching=sharing))
    if engine.core.memory.prefix_cache is not None:
        engine.core.memory.prefix_cache.share_partial_blocks = to_the_token
    engine.start(MODEL_THREAD)
    try:
        await time_to_first_token(engine, warm_up)
        before = engine.load
        if at_once:
            ttfts = list(await asyncio.gather(*(time_to_first_token(engine, ids) for ids in prompts)))
        else:
            ttfts = [await time_to_first_token(engine, ids) for ids in prompts]
        after = engine.load
        return TtftRun(sorted(ttfts), after.prefix_cache_hits, after.step_time_s_total - before.step_time_s_total,
                       after.forward_time_s_total - before.forward_time_s_total)
    finally:
        engine.shutdown()


async def ttft_with_and_without_sharing(args: argparse.Namespace, bundle: ModelBundle) -> None:
    _, prompts = shared_prompts(bundle, args.requests + 1)
    p50 = {}
    for sharing in (False, True):
        # The first prompt warms up; with sharing it also caches the system prompt.
        run = await measure_ttfts(args, bundle, sharing, prompts[0], prompts[1:], at_once=False)
        ttfts, cached = run.ttfts, run.num_cached_tokens
        p50[sharing] = statistics.median(ttfts)
        print(f"  prefix sharing {'on ' if sharing else 'off'}: TTFT p50 {p50[sharing] * 1000:7.1f} ms, "
              f"p90 {ttfts[int(0.9 * len(ttfts))] * 1000:7.1f} ms, cached prompt tokens {cached}")
    print(f"  => {p50[False] / p50[True]:.1f}x lower p50 TTFT with sharing "
          f"({len(prompts[1])} prompt tokens, {SYSTEM_TOKENS} shared)")


async def burst_ttft_with_and_without_sharing(args: argparse.Namespace, bundle: ModelBundle) -> None:
    """The same prompts all at once, cache cold (many users start on a new system prompt together):
    with sharing, one request computes the system prompt and the others wait for it, then run their
    own tails together."""
    _, prompts = shared_prompts(bundle, args.requests)
    unrelated = bundle.tokenizer.encode("Hello there, how are you today? " * 30, add_special_tokens=False)
    p50 = {}
    for sharing in (False, True):
        run = await measure_ttfts(args, bundle, sharing, unrelated, prompts, at_once=True)
        ttfts, cached = run.ttfts, run.num_cached_tokens
        p50[sharing] = statistics.median(ttfts)
        print(f"  prefix sharing {'on ' if sharing else 'off'}: TTFT p50 {p50[sharing] * 1000:7.1f} ms, "
              f"first {ttfts[0] * 1000:7.1f} ms, last {ttfts[-1] * 1000:7.1f} ms, cached prompt tokens {cached}")
    print(f"  => {p50[False] / p50[True]:.1f}x lower p50 TTFT with sharing ({len(prompts)} requests at once)")


def chat_prompts(bundle: ModelBundle, num_requests: int, system_tokens: int) -> list[list[int]]:
    """A system prompt of about `system_tokens`, then one short question each, as the chat template renders them."""
    tokenizer = bundle.tokenizer
    system = tokenizer.decode(tokenizer.encode(GUIDELINES * 16, add_special_tokens=False)[:system_tokens])
    prompts = []
    for index in range(num_requests):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return prompts


def num_shared_tokens(prompts: list[list[int]]) -> int:
    return min(next(i for i, (a, b) in enumerate(zip(prompts[0], ids, strict=False)) if a != b) for ids in prompts[1:])


async def ttft_to_the_token(args: argparse.Namespace, bundle: ModelBundle) -> None:
    """Part 1d. The system prompt is trimmed so that the shared prefix ends half way through a block,
    the average place when prompt lengths fall at random (a prefix that ends on a block boundary
    gains nothing from sharing to the token)."""
    prompts = chat_prompts(bundle, args.requests + 1, EXACT_SYSTEM_TOKENS)
    trim = (BLOCK_SIZE // 2 - num_shared_tokens(prompts)) % BLOCK_SIZE
    prompts = chat_prompts(bundle, args.requests + 1, EXACT_SYSTEM_TOKENS + trim)
    num_shared = num_shared_tokens(prompts)
    print(f"  prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, the first {num_shared} "
          f"shared by all ({num_shared % BLOCK_SIZE} past the last whole {BLOCK_SIZE}-token block)")
    p50 = {}
    for label, sharing, to_the_token in (("off", False, False), ("whole blocks", True, False),
                                         ("to the token", True, True)):
        run = await measure_ttfts(args, bundle, sharing, prompts[0], prompts[1:], False, to_the_token)
        p50[label] = statistics.median(run.ttfts)
        num_measured = len(run.ttfts)
        print(f"  sharing {label:>12}: TTFT p50 {p50[label] * 1000:7.1f} ms, p90 "
              f"{run.ttfts[int(0.9 * num_measured)] * 1000:7.1f} ms, cached prompt tokens {run.num_cached_tokens}; "
              f"per request: steps {run.step_s / num_measured * 1000:6.1f} ms, of which forward "
              f"{run.forward_s / num_measured * 1000:6.1f} ms")
    for label in ("whole blocks", "to the token"):
        print(f"  => sharing {label}: {p50['off'] / p50[label]:.1f}x lower p50 TTFT than cold")


def transformers_reference(args: argparse.Namespace, bundle: ModelBundle) -> None:
    """Parts 1 and 1b with transformers' own continuous batching (`generate_batch`, paged KV, block
    sharing on and off, 16-token pages as mace's), on the same prompts and threads."""
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    _, prompts = shared_prompts(bundle, args.requests + 1)
    generation = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=None)
    model = bundle.causal_lm
    for sharing in (False, True):
        batching = ContinuousBatchingConfig(page_size=16, allow_block_sharing=sharing, max_batch_tokens=1024)

        def one_at_a_time(batching: ContinuousBatchingConfig = batching) -> list[float]:
            """Through one long-lived manager (its serving API), so a cached prefix can be found again."""
            manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
            manager.start()
            try:
                ttfts = []
                for ids in prompts:
                    started = time.perf_counter()
                    manager.get_result(manager.add_request(ids, max_new_tokens=1), timeout=300)
                    ttfts.append(time.perf_counter() - started)
            finally:
                manager.stop(block=True)
            return ttfts[1:]  # the first one warms up

        def at_once(batching: ContinuousBatchingConfig = batching) -> list[float]:
            outputs = model.generate_batch(prompts[1:], generation_config=generation,
                                           continuous_batching_config=batching, record_timestamps=True,
                                           progress_bar=False)
            return [out.timestamps[0] - out.created_time for out in outputs.values()]

        single = statistics.median(MODEL_THREAD.submit(one_at_a_time).result())
        burst = statistics.median(MODEL_THREAD.submit(at_once).result())
        print(f"  transformers, block sharing {'on ' if sharing else 'off'}: TTFT p50 {single * 1000:7.1f} ms "
              f"one at a time, {burst * 1000:7.1f} ms all at once")


async def concurrency_at_fixed_budget(args: argparse.Namespace, bundle: ModelBundle) -> None:
    """512-token prompts, all submitted at once, in a budget too small for all of them without pruning;
    with it, each sequence's KV is held to 256 tokens (50% of its prompt) once its prompt is in. A
    loose TPOT target lets whole prompts in at once, so memory, not prefill pacing, limits the batch."""
    tokenizer = bundle.tokenizer
    prompts = [tokenizer.encode(f"Story {i}. " + GUIDELINES * 3, add_special_tokens=False)[:512]
               for i in range(args.sequences)]
    for label, memory in (("off", {"kv_pruning": False}), ("50%", {"kv_pruning": True, "prune_seq_tokens": 256})):
        engine = AsyncEngine(bundle, make_config(args, args.budget_mib, tpot_s=30.0, prefix_caching=False, **memory))
        peak = 0

        async def one(ids: list[int], engine: AsyncEngine = engine) -> int:
            nonlocal peak
            count = 0
            params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
            async for delta in engine.generate(ids, params):
                count += len(delta.new_token_ids)
                peak = max(peak, len(engine.core.scheduler.running))
            return count

        engine.start(MODEL_THREAD)
        started = time.perf_counter()
        try:
            tokens = sum(await asyncio.gather(*(one(ids) for ids in prompts)))
        finally:
            engine.shutdown()
        elapsed = time.perf_counter() - started
        stats = engine.load
        print(f"  pruning {label}: {stats.kv_blocks_total} blocks, peak {peak} sequences at once, "
              f"{tokens / elapsed:6.1f} tokens/s, {stats.num_preemptions} preemptions, {elapsed:5.1f} s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--parts", default="ttft,burst,transformers,exact,concurrency,quality")
    parser.add_argument("--requests", type=int, default=10, help="measured requests per TTFT run")
    parser.add_argument("--budget-mib", type=int, default=160, help="part 2's memory budget")
    parser.add_argument("--sequences", type=int, default=16, help="part 2: long requests submitted at once")
    parser.add_argument("--decode-tokens", type=int, default=64, help="part 2: tokens each generates")
    args = parser.parse_args()
    config = make_config(args, args.budget_mib)
    # Load on the thread that then runs every engine: a second thread that has run OpenMP work
    # slows the engine's kernels on CPU (the server does the same).
    bundle = MODEL_THREAD.submit(load_model, config.model, config.cache_dir).result()
    parts = args.parts.split(",")
    if "ttft" in parts:
        print(f"1. Prefix sharing ({args.model}, {args.requests} requests one at a time)")
        await ttft_with_and_without_sharing(args, bundle)
    if "burst" in parts:
        print(f"1b. Prefix sharing, {args.requests} requests at once on a cold cache")
        await burst_ttft_with_and_without_sharing(args, bundle)
    if "transformers" in parts:
        print("1c. The same with transformers' continuous batching (generate_batch) for reference")
        transformers_reference(args, bundle)
    if "exact" in parts:
        print(f"1d. Prefix sharing to the token ({args.model}, {args.requests} chat requests one at a time)")
        await ttft_to_the_token(args, bundle)
    if "concurrency" in parts:
        print(f"2. KV pruning at a fixed budget ({args.budget_mib} MiB, {args.sequences} x 512-token prompts)")
        await concurrency_at_fixed_budget(args, bundle)
    if "quality" in parts:
        print("3. Pruning's quality cost (perplexity of a held-out continuation)")
        print_quality_table(bundle)


if __name__ == "__main__":
    asyncio.run(main())
