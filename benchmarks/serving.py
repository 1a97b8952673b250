"""Serving throughput on this CPU: mace against what transformers offers, and against a bare decode loop.

One run, one model (SmolLM2-135M-Instruct, from the converted checkpoint in the cache dir), the same chat
prompts, and exactly NEW_TOKENS greedy tokens per request (EOS ignored), so every system does the same work
and output tokens/s compare directly. Systems run one after another, never side by side, each with two
torch threads, so none steals CPU from another. mace runs twice: in fp32 (against the fp32 baselines) and
in its default dtype (`auto`: bf16 where the CPU has AMX or avx512_bf16). The bare loop (all prompts
prefilled together, then batched greedy decode steps, no scheduler, no server) is the practical limit on
this machine; the ratio against it, same dtype, is how much of that mace keeps. At 1 concurrent, requests
run one after another and TPOT p50 is the median over them of (last token - first token) / (tokens - 1);
for the bare loop it is the median decode step at batch 1. Time to ready: from process start to /ready,
with an empty cache dir (cold: converts the model) and with the converted model there (warm). Also
prints the bf16 quality guard (greedy tokens agreeing with fp32 over 50 prompts, held-out perplexity) and
training micro-step tokens/s per dtype. Prints a Markdown table; never fails on speed.

    .venv/bin/python benchmarks/serving.py [--quick] [--skip-transformers-serve] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a plain script by `make bench`
from _bench_utils import PROMPTS, CpuContention, Server, free_port, scrape_metrics, timed_request

THREADS = 2
NEW_TOKENS = 48
ONE_AT_A_TIME = 4  # requests run one after another at 1 concurrent (TPOT p50 is over them)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: mace, transformers
TS_NAME = "transformers serve --continuous-batching"
BARE_NAME = "bare batched decode loop"
FWD, STEP = "mace:engine_forward_seconds_total", "mace:engine_step_seconds_total"
STEPS = "mace:engine_steps_total"
ENGINE_SERIES = (FWD, STEP, STEPS)
# Subprocesses get the same thread budget as the in-process runs.
THREAD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}

# mace as shipped (SLO scheduling: at most the requests whose steps fit the 0.2 s TPOT target decode
# at once, the rest queue), then first-come-first-served: every request decodes at once, as in the other
# systems, none of which has a latency target. The first pair is what a user gets; the second is the
# engine's throughput, which the comparisons with the others are about.
MACE_ROWS = (("mace serve", "float32", "slo"), ("mace serve, default dtype (auto)", None, "slo"),
             ("mace serve, fcfs", "float32", "fcfs"), ("mace serve, default dtype (auto), fcfs", None, "fcfs"))

Cell = float | str  # a figure, or why there is none
notes: list[str] = []


@dataclass
class Row:
    dtype: str  # "float32" | "bfloat16": ratios are against the bare loop of the same dtype
    cells: dict[int, Cell]  # tok/s by concurrency
    tpot_s: Cell = "n/a"  # p50 at 1 concurrent
    ready_s: tuple[Cell, Cell] = ("n/a", "n/a")  # time to ready: cold cache, warm cache
    extra: dict[str, str] = field(default_factory=dict)


def check_lengths(system: str, lengths: list[int], new_tokens: int) -> None:
    """Tok/s only compare if every request really generated new_tokens: say so when one did not."""
    if any(n != new_tokens for n in lengths):
        notes.append(f"{system}: expected {new_tokens} tokens per request, got {sorted(set(lengths))}")


def chat_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """The chat-templated prompt token ids, as the servers build them from `messages`."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.inference_mode()
def bench_sequential(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """model.generate() one request at a time: (tok/s, seconds per token including prefill)."""
    model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=2)  # warm-up
    total, start = 0, time.perf_counter()
    lengths = []
    for ids in prompts:
        inp = torch.tensor([ids])
        out = model.generate(
            inp, attention_mask=torch.ones_like(inp), do_sample=False,
            min_new_tokens=new_tokens, max_new_tokens=new_tokens,
        )
        lengths.append(out.shape[1] - inp.shape[1])
        total += lengths[-1]
    elapsed = time.perf_counter() - start
    check_lengths("generate()", lengths, new_tokens)
    return total / elapsed, elapsed / total


@torch.inference_mode()
def bare_loop(model: Any, prompts: list[list[int]], pad_id: int, new_tokens: int) -> tuple[float, float]:
    """Left-pad, prefill the whole batch at once into one DynamicCache, then greedy-decode the whole batch.
    Returns (tok/s including the prefill, the median decode step in seconds)."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                logits_to_keep=1)  # only the last position's logits are needed
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    steps = []
    for _ in range(new_tokens - 1):
        step_start = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - step_start)
    return len(prompts) * new_tokens / (time.perf_counter() - start), statistics.median(steps)


async def drive(base_url: str, bodies: list[dict[str, Any]], together: bool) -> tuple[float, list[int], list[float]]:
    """All bodies at once (or one after another): (tok/s until the last stream ends, tokens, TPOTs)."""
    url = base_url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the server must see every request
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(1800)) as session:
        start = time.perf_counter()
        if together:
            results = list(await asyncio.gather(*(timed_request(session, url, b) for b in bodies)))
        else:
            results = [await timed_request(session, url, b) for b in bodies]
        elapsed = time.perf_counter() - start
    tokens = [n for n, _ in results]
    return sum(tokens) / elapsed, tokens, [t for _, t in results]


async def bench_server(server: Server, make_body: Any, levels: list[int], new_tokens: int,
                       ready_timeout: float) -> tuple[Row, dict[str, float] | None]:
    """Once the server is ready: one full warm-up request, then each level's requests. For a server with
    mace's metrics, each level's time is also split into the engine's steps (their forward, the rest) and
    the time the engine waited (`where the time goes`)."""
    await server.wait_ready(ready_timeout)
    ready_s = time.monotonic() - server.started_s
    bodies = [make_body(p) for p in PROMPTS]
    # The warm-up matters for transformers serve: it sets up continuous batching on the first request.
    await drive(server.base_url, bodies[:1], together=True)
    first = await scrape_metrics(server.base_url, ENGINE_SERIES)
    row = Row("float32", {}, ready_s=("n/a", ready_s))
    before = first
    for n in levels:
        batch = bodies[:ONE_AT_A_TIME] if n == 1 else bodies[:n]
        started = time.perf_counter()
        tok_s, tokens, tpots = await drive(server.base_url, batch, together=n > 1)
        wall_s = time.perf_counter() - started
        check_lengths(f"{server.name}({n})", tokens, new_tokens)
        row.cells[n] = tok_s
        if n == 1:
            row.tpot_s = statistics.median(tpots)
        after = await scrape_metrics(server.base_url, ENGINE_SERIES)
        spent = engine_deltas(before, after)
        if spent is not None:
            row.extra[f"time at {n}"] = time_split(spent, wall_s)
        before = after
    return row, engine_deltas(first, before)


def engine_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None or not all(k in after and k in before for k in ENGINE_SERIES):
        return None
    return {k: after[k] - before[k] for k in ENGINE_SERIES}


def time_split(spent: dict[str, float], wall_s: float) -> str:
    """One level's wall time as the engine spent it: stepping (forward, the rest) or waiting."""
    steps, step_s, forward_s = int(spent[STEPS]), spent[STEP], spent[FWD]
    mean_ms = 1000 * step_s / steps if steps else 0.0
    return (f"{wall_s:.1f} s wall: {steps} steps of {mean_ms:.0f} ms on average, {step_s / wall_s:.0%} of the wall "
            f"time (forward {forward_s / wall_s:.0%}, planning and bookkeeping {(step_s - forward_s) / wall_s:.0%}), "
            f"waiting for work {max(0.0, 1 - step_s / wall_s):.0%}")


class TimedServer(Server):
    """A Server that remembers when its process started (time to ready)."""

    def __enter__(self) -> TimedServer:
        self.started_s = time.monotonic()
        super().__enter__()
        return self


def reason(exc: BaseException) -> str:
    """One table-safe line saying why a row has no number."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return "failed: " + msg.replace("|", "/")[:120]


def mace_argv(args: argparse.Namespace, port: int, dtype: str | None) -> list[str]:
    argv = [str(BIN / "mace"), "serve", "--model", args.model_arg, "--host", "127.0.0.1", "--port", str(port)]
    return argv + (["--dtype", dtype] if dtype else [])


def mace_env(cache_dir: Path, data_dir: str) -> dict[str, str]:
    # Serving only: no fine-tuning competing for the CPU, and the benchmark's chats stay out of the
    # user's feedback journal (a throwaway data dir, removed afterwards).
    return {**THREAD_ENV, "MACE_CACHE_DIR": str(cache_dir), "MACE_MODEL__NUM_THREADS": str(THREADS),
            "MACE_TRAIN__POLICY": "none", "MACE_DATA_DIR": data_dir}


def mace_ready_cold(args: argparse.Namespace, dtype: str | None) -> Cell:
    """Seconds from start to /ready with an empty cache dir (the model is converted on the way)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-mace-cold-") as scratch:
        env = mace_env(Path(scratch) / "cache", str(Path(scratch) / "data"))
        with TimedServer("mace-cold", mace_argv(args, port, dtype), env, port, "/ready") as server:
            asyncio.run(server.wait_ready(args.ready_timeout))
            return time.monotonic() - server.started_s


def warm_up_fit(log_path: Path) -> str | None:
    """The decode cap and latency fit the server's warm-up logged: at 8 and 32 concurrent the cap, not
    the forward, sets mace's rows, and it is fitted anew at every start."""
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "engine warmed up":
                fit = event.get("latency_model", {})
                return (f"decode cap {event.get('decode_cap')}, margin {event.get('latency_margin_s')} s, "
                        f"base {fit.get('base')} s, batched forward {fit.get('batched_forward')} s, "
                        f"per decode {fit.get('decode_token')} s")
    return None


def run_mace(args: argparse.Namespace, levels: list[int], new_tokens: int, dtype: str | None,
             scheduling: str = "slo") -> Row:
    """`dtype` None: the server's default. `scheduling` "fcfs": no SLO decode cap and no shedding, every
    request decodes at once as in the other systems (none of which has a latency target)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-mace-data-") as data_dir, \
            TimedServer("mace", mace_argv(args, port, dtype),
                        {**mace_env(args.cache_dir, data_dir), "MACE_ENGINE__SCHEDULING": scheduling}, port,
                        "/ready") as server:

        def body(prompt: str) -> dict[str, Any]:  # mace serves the model under the name it was started with
            return {"model": args.model_arg, "messages": [{"role": "user", "content": prompt}], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True}  # mace extension: generate exactly max_tokens

        row, deltas = asyncio.run(bench_server(server, body, levels, new_tokens, args.ready_timeout))
        warm_up = warm_up_fit(server.log)
    row.dtype = dtype or args.default_dtype
    if warm_up:
        row.extra["warm-up"] = warm_up
    if deltas and deltas[STEP] > 0:
        row.extra["overhead"] = f"{1 - deltas[FWD] / deltas[STEP]:.1%} of engine step time outside the forward"
    return row


def run_transformers_serve(args: argparse.Namespace, levels: list[int], new_tokens: int) -> Row:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"skipped: {', '.join(missing)} missing (pip install -e '.[bench]')"
        return Row("float32", dict.fromkeys(levels, why))
    port = free_port()
    model = str(args.model_dir)  # a local checkpoint dir: served as is, no hub lookup
    argv = [str(BIN / "transformers"), "serve", model, "--continuous-batching", "--device", "cpu",
            "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    env = {**THREAD_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # It rejects unknown fields (ignore_eos) and ignores stream_options, but takes a GenerationConfig as JSON;
    # eos_token_id=-1 disables EOS under continuous batching. Its last chunk always carries usage.
    gen = json.dumps({"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": -1})

    def body(prompt: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "max_tokens": new_tokens, "temperature": 0, "generation_config": gen}

    with TimedServer("transformers-serve", argv, env, port, "/health") as server:
        row, _ = asyncio.run(bench_server(server, body, levels, new_tokens, args.ready_timeout))
    return row


def attempt(label: str, fn: Any, *fn_args: Any) -> Any:
    """fn's result, or the reason it failed: one broken system must not stop the others."""
    print(f"running {label} ...", file=sys.stderr, flush=True)
    try:
        return fn(*fn_args)
    except Exception as exc:
        traceback.print_exc()
        return reason(exc)


def bare_row(model: Any, dtype: str, prompts: list[list[int]], pad_id: int, levels: list[int],
             new_tokens: int) -> Row:
    row = Row(dtype, {})
    for n in levels:
        result = attempt(f"bare loop {dtype} {n}", bare_loop, model, prompts[:n], pad_id, new_tokens)
        row.cells[n] = result[0] if isinstance(result, tuple) else result
        if isinstance(result, tuple):
            row.extra[f"time at {n}"] = f"median decode step {1000 * result[1]:.0f} ms"
            if n == 1:
                row.tpot_s = result[1]
    return row


def run_in_process(args: argparse.Namespace, levels: list[int], new_tokens: int) -> dict[str, Row]:
    """generate() one at a time (fp32), then the bare batched loop in fp32 and in bf16."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = chat_ids(tokenizer, PROMPTS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: dict[str, Row] = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, dtype)).eval()
        bare_loop(model, prompts[:2], pad_id, 2)  # warm-up: the first forwards allocate and pick kernels
        if dtype == "float32":
            sequential = attempt("generate()", bench_sequential, model, prompts[:ONE_AT_A_TIME], new_tokens)
            name = f"transformers generate(), one request at a time ({ONE_AT_A_TIME} requests)"
            if isinstance(sequential, tuple):  # no concurrency level: the same figure under every level
                rows[name] = Row(dtype, dict.fromkeys(levels, sequential[0]), tpot_s=sequential[1])
            else:
                rows[name] = Row(dtype, dict.fromkeys(levels, sequential))
        rows[f"{BARE_NAME} {dtype}"] = bare_row(model, dtype, prompts, pad_id, levels, new_tokens)
    return rows

def train_tokens_per_s(bundle: Any, train_config: Any) -> float:
    """One layered micro-step (forward and backward by decoder layer) on 4 samples x 64 tokens, plus AdamW."""
    from mace.train.learner import Learner
    from mace.train.replay import TrainSample

    learner = Learner(bundle.causal_lm, train_config)
    vocab = int(bundle.causal_lm.config.vocab_size)

    def run(samples: list[TrainSample]) -> None:
        step = learner.micro_step(samples)
        while not step.is_done:
            step.run_next()

    samples = [TrainSample(i, [(31 + 97 * i + 13 * t) % vocab for t in range(64)], 48, 0.0) for i in range(4)]
    run(samples[:1])  # warm-up
    learner.discard_gradients()
    start = time.perf_counter()
    run(samples)
    learner.accumulated(len(samples))
    learner.optimizer_step()
    return sum(s.num_tokens for s in samples) / (time.perf_counter() - start)


def quality_and_training(args: argparse.Namespace) -> list[str]:
    """bf16 against fp32 through mace's engine (the quality guard), and training tokens/s per dtype."""
    from mace.config import load_config
    from mace.engine.frontend import AsyncEngine
    from mace.logging import configure_logging
    from mace.model.loader import load_model
    from mace.model.quality import PROMPTS as GUARD_PROMPTS
    from mace.model.quality import greedy_answers, perplexity, token_agreement

    configure_logging("warning")
    answers, ppl, train = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory(prefix="bench-mace-data-") as data_dir:
            # Loose latency targets: without warm-up the scheduler plans on priors and would serve the
            # prompts nearly one at a time; the answers, not the speed, are measured here.
            config = load_config(None, {"model": {"name": args.model_arg, "dtype": dtype},
                                        "slo": {"ttft_s": 600.0, "tpot_s": 60.0},
                                        "train": {"policy": "none"}, "cache_dir": str(args.cache_dir),
                                        "data_dir": data_dir}, environ={})
            bundle = load_model(config.model, config.cache_dir)
            answers[dtype] = asyncio.run(greedy_answers(AsyncEngine(bundle, config), max_tokens=16))
            ppl[dtype] = perplexity(bundle)
            train[dtype] = train_tokens_per_s(bundle, config.train)
    agreement = token_agreement(answers["float32"], answers["bfloat16"])
    change = ppl["bfloat16"] / ppl["float32"] - 1
    return [
        f"bf16 quality guard: {agreement:.1%} of greedy tokens agree with fp32 over {len(GUARD_PROMPTS)} prompts "
        f"x 16 tokens (guard >= 90%); held-out perplexity {ppl['float32']:.3f} fp32, {ppl['bfloat16']:.3f} bf16 "
        f"({change:+.2%}, guard within 2%)",
        f"training micro-step (layered, 4 x 64 tokens, LoRA r=8 q/v, AdamW): {train['float32']:.0f} tok/s fp32, "
        f"{train['bfloat16']:.0f} tok/s bf16 (autocast, fp32 LoRA state)",
    ]


def ratio(value: Cell, reference: Cell) -> str:
    if isinstance(value, float) and isinstance(reference, float) and reference > 0:
        return f"{value / reference:.2f}×"
    return "n/a"


def print_table(rows: dict[str, Row], levels: list[int]) -> None:
    def fmt(cell: Cell, scale: float = 1.0, digits: int = 1) -> str:
        return f"{cell * scale:.{digits}f}" if isinstance(cell, float) else cell

    slash = "/".join(map(str, levels))
    heads = [f"{n} concurrent tok/s" for n in levels] + [
        "TPOT p50 at 1 (ms)", "time to ready cold / warm (s)", f"vs transformers serve fp32 ({slash})",
        f"vs bare loop, same dtype ({slash})", "TPOT vs bare decode step"]
    print("| system | dtype | " + " | ".join(heads) + " |")
    print("|---" * (2 + len(heads)) + "|")
    ts = rows.get(TS_NAME)
    for name, row in rows.items():
        bare = rows.get(f"{BARE_NAME} {row.dtype}")
        vs_ts = " / ".join(ratio(row.cells.get(n, ""), ts.cells.get(n, "") if ts else "") for n in levels)
        vs_bare = " / ".join(ratio(row.cells.get(n, ""), bare.cells.get(n, "") if bare else "") for n in levels)
        tpot_ratio = ratio(row.tpot_s, bare.tpot_s if bare else "")
        cells = [fmt(row.cells.get(n, "not run")) for n in levels] + [
            fmt(row.tpot_s, 1000), " / ".join(fmt(c) for c in row.ready_s), vs_ts, vs_bare, tpot_ratio]
        print(f"| {name} | {row.dtype} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="HF checkpoint dir (default: SmolLM2 in cache dir)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/4 requests, 16 tokens")
    parser.add_argument("--skip-transformers-serve", action="store_true")
    parser.add_argument("--skip-quality", action="store_true", help="no bf16 quality guard, no training figures")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for a server")
    args = parser.parse_args()
    # A SIGTERM (e.g. from a CI timeout) must still run the `finally`s that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(THREADS)
    from mace.model.loader import resolve_dtype

    args.default_dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    args.cache_dir = Path(os.environ.get("MACE_CACHE_DIR", "~/.cache/mace")).expanduser()
    args.model_arg = str(args.model_dir.resolve()) if args.model_dir else "builtin:smollm2"
    if args.model_dir is None:
        from mace.model import smollm2

        args.model_dir = smollm2.prepare(args.cache_dir)  # converts once (~30 s), later instant
    args.model_dir = args.model_dir.resolve()
    levels, new_tokens = ([1, 4], 16) if args.quick else ([1, 8, 32], NEW_TOKENS)
    print(f"model {args.model_dir}, {new_tokens} new tokens/request, greedy, EOS ignored, "
          f"{THREADS} torch threads, levels {levels}, default dtype {args.default_dtype}", file=sys.stderr, flush=True)

    rows: dict[str, Row] = {}
    contention = CpuContention()
    for label, dtype, scheduling in MACE_ROWS:
        result = attempt(f"{label} ({dtype or 'auto'})", run_mace, args, levels, new_tokens, dtype, scheduling)
        rows[label] = result if isinstance(result, Row) else Row(dtype or args.default_dtype,
                                                                dict.fromkeys(levels, result))
    cold = attempt("mace serve from an empty cache dir", mace_ready_cold, args, None)
    default_row = rows["mace serve, default dtype (auto)"]
    default_row.ready_s = (cold if isinstance(cold, float) else "failed", default_row.ready_s[1])
    if args.skip_transformers_serve:
        rows[TS_NAME] = Row("float32", dict.fromkeys(levels, "skipped (--skip-transformers-serve)"))
    else:
        result = attempt(TS_NAME, run_transformers_serve, args, levels, new_tokens)
        rows[TS_NAME] = result if isinstance(result, Row) else Row("float32", dict.fromkeys(levels, result))
    rows.update(run_in_process(args, levels, new_tokens))
    extra = [] if args.skip_quality else attempt("quality guard and training", quality_and_training, args)

    print()
    print_table(rows, levels)
    print()
    for label, _, _ in MACE_ROWS:
        overhead = rows[label].extra.get("overhead", "n/a")
        print(f"{label}: engine overhead (1 - forward/step over the measured requests): {overhead}")
        print(f"{label}: warm-up fit: {rows[label].extra.get('warm-up', 'n/a')}")
    print("\nWhere the time goes, per concurrency level:")
    for label, row in rows.items():
        for n in levels:
            if f"time at {n}" in row.extra:
                print(f"- {label}, {n} concurrent: {row.extra[f'time at {n}']}")
    for line in extra if isinstance(extra, list) else [f"quality guard: {extra}"]:
        print(line)
    print(f"machine load during the run: {contention.report()} (if high, rerun on a quiet machine)")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
