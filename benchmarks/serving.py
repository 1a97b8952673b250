"""Serving throughput on this CPU: mace against what transformers offers, and against a bare decode loop.

One run, one model (SmolLM2-135M-Instruct, fp32, from the converted checkpoint in the cache dir), the same
chat prompts, and exactly NEW_TOKENS greedy tokens per request (EOS ignored), so every system does the same
work and output tokens/s compare directly. Systems run one after another, never side by side, each with
two torch threads, so none steals CPU from another. The bare loop (all prompts prefilled together, then
batched greedy decode steps, no scheduler, no server) is the practical limit on this machine; the ratio
against it is how much of that mace keeps. Prints a Markdown table; never fails on speed.

    .venv/bin/python benchmarks/serving.py [--quick] [--skip-transformers-serve] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a plain script by `make bench`
from _bench_utils import PROMPTS, CpuContention, Server, drive, free_port, scrape_metrics

THREADS = 2
NEW_TOKENS = 48
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: mace, transformers
TS_NAME = "transformers serve --continuous-batching"
BARE_NAME = "bare batched decode loop (practical limit)"
FWD, STEP = "mace:engine_forward_seconds_total", "mace:engine_step_seconds_total"
# Subprocesses get the same thread budget as the in-process runs.
THREAD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}

Cell = float | str  # tokens/s, or why there is no number
notes: list[str] = []


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
def bench_sequential(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """model.generate() one request at a time: what a naive server built on transformers does."""
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
    return total / elapsed


@torch.inference_mode()
def bare_loop(model: Any, prompts: list[list[int]], pad_id: int, new_tokens: int) -> float:
    """Left-pad, prefill the whole batch at once into one DynamicCache, then greedy-decode the whole batch."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                logits_to_keep=1)  # only the last position's logits are needed
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def bench_generate_batch(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """transformers' continuous batching (paged attention), in-process, no HTTP."""
    # eos_token_id=-1 is how continuous batching disables EOS: every request runs to max_new_tokens.
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - start
    lengths = [len(r.generated_tokens) for r in results.values()]
    lengths += [0] * (len(prompts) - len(lengths))  # a request it dropped counts as zero tokens
    check_lengths(f"generate_batch({len(prompts)})", lengths, new_tokens)
    return sum(lengths) / elapsed


async def bench_server(server: Server, make_body: Any, levels: list[int], new_tokens: int,
                       ready_timeout: float) -> tuple[dict[int, Cell], dict[str, float] | None]:
    """Once the server is ready: one full warm-up request, then each level's requests all at once."""
    await server.wait_ready(ready_timeout)
    bodies = [make_body(p) for p in PROMPTS]
    # The warm-up matters for transformers serve: it sets up continuous batching on the first request.
    await drive(server.base_url, bodies[:1])
    before = await scrape_metrics(server.base_url, (FWD, STEP))
    cells: dict[int, Cell] = {}
    for n in levels:
        result = await drive(server.base_url, bodies[:n])
        check_lengths(f"{server.name}({n})", result.tokens, new_tokens)
        cells[n] = result.tok_per_s
    after = await scrape_metrics(server.base_url, (FWD, STEP))
    deltas = None
    if before is not None and after is not None and all(k in after and k in before for k in (FWD, STEP)):
        deltas = {k: after[k] - before[k] for k in (FWD, STEP)}
    return cells, deltas


def reason(exc: BaseException) -> str:
    """One table-safe line saying why a row has no number."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return "failed: " + msg.replace("|", "/")[:120]


def run_mace(args: argparse.Namespace, levels: list[int], new_tokens: int) -> tuple[dict[int, Cell], str]:
    port = free_port()
    model_arg = str(args.model_dir) if args.model_dir_given else "builtin:smollm2"
    argv = [str(BIN / "mace"), "serve", "--config", str(REPO / "configs/default.toml"), "--model", model_arg,
            "--host", "127.0.0.1", "--port", str(port)]
    env = {**THREAD_ENV, "MACE_CACHE_DIR": str(args.cache_dir), "MACE_MODEL__NUM_THREADS": str(THREADS),
           # Serving only: no fine-tuning competing for the CPU, and the benchmark's chats stay out of the
           # user's feedback journal (a throwaway data dir, removed afterwards).
           "MACE_TRAIN__POLICY": "none"}
    with tempfile.TemporaryDirectory(prefix="bench-mace-data-") as data_dir, \
            Server("mace", argv, {**env, "MACE_DATA_DIR": data_dir}, port, "/ready") as server:

        def body(prompt: str) -> dict[str, Any]:  # mace serves the model under the name it was started with
            return {"model": model_arg, "messages": [{"role": "user", "content": prompt}], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True}  # mace extension: generate exactly max_tokens

        cells, deltas = asyncio.run(bench_server(server, body, levels, new_tokens, args.ready_timeout))
    overhead = "n/a"
    if deltas and deltas[STEP] > 0:
        overhead = f"{1 - deltas[FWD] / deltas[STEP]:.1%} of engine step time outside the model forward"
    return cells, overhead


def run_transformers_serve(args: argparse.Namespace, levels: list[int], new_tokens: int) -> dict[int, Cell]:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return dict.fromkeys(levels, f"skipped: {', '.join(missing)} missing (pip install -e '.[bench]')")
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

    with Server("transformers-serve", argv, env, port, "/health") as server:
        cells, _ = asyncio.run(bench_server(server, body, levels, new_tokens, args.ready_timeout))
    return cells


def attempt(label: str, fn: Any, *fn_args: Any) -> Cell:
    """fn's tok/s, or the reason it failed: one broken system must not stop the others."""
    print(f"running {label} ...", file=sys.stderr, flush=True)
    try:
        return float(fn(*fn_args))
    except Exception as exc:
        traceback.print_exc()
        return reason(exc)


def run_in_process(args: argparse.Namespace, levels: list[int], new_tokens: int,
                   sequential_n: int) -> dict[str, dict[int, Cell]]:
    """generate() one at a time, the bare batched loop, then generate_batch (last: continuous batching
    may swap the model's attention implementation for a paged one)."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    prompts = chat_ids(tokenizer, PROMPTS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bare_loop(model, prompts[:2], pad_id, 2)  # warm-up: the first forwards allocate and pick kernels
    sequential = attempt("generate()", bench_sequential, model, prompts[:sequential_n], new_tokens)
    return {
        # One request at a time has no concurrency level: the same number goes under every level.
        f"transformers generate(), one request at a time ({sequential_n} requests)":
            dict.fromkeys(levels, sequential),
        BARE_NAME: {n: attempt(f"bare loop {n}", bare_loop, model, prompts[:n], pad_id, new_tokens)
                    for n in levels},
        "transformers generate_batch (continuous batching, in-process)":
            {n: attempt(f"generate_batch {n}", bench_generate_batch, model, prompts[:n], new_tokens)
             for n in levels},
    }


def ratio(value: Cell, reference: Cell) -> str:
    if isinstance(value, float) and isinstance(reference, float) and reference > 0:
        return f"{value / reference:.2f}×"
    return "n/a"


def print_table(rows: dict[str, dict[int, Cell]], levels: list[int]) -> None:
    def fmt(cell: Cell) -> str:
        return f"{cell:.1f}" if isinstance(cell, float) else cell

    heads = [f"{n} concurrent tok/s" for n in levels]
    ratio_heads = [f"ratio vs transformers serve ({'/'.join(map(str, levels))})",
                   f"ratio vs bare loop ({'/'.join(map(str, levels))})"]
    print("| system | " + " | ".join(heads + ratio_heads) + " |")
    print("|---" * (1 + len(heads) + 2) + "|")
    for name, cells in rows.items():
        values = [fmt(cells.get(n, "not run")) for n in levels]
        vs_ts = " / ".join(ratio(cells.get(n, ""), rows.get(TS_NAME, {}).get(n, "")) for n in levels)
        vs_bare = " / ".join(ratio(cells.get(n, ""), rows.get(BARE_NAME, {}).get(n, "")) for n in levels)
        print(f"| {name} | " + " | ".join([*values, vs_ts, vs_bare]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="HF checkpoint dir (default: SmolLM2 in cache dir)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4/8 requests, 16 tokens")
    parser.add_argument("--skip-transformers-serve", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for a server")
    args = parser.parse_args()
    # A SIGTERM (e.g. from a CI timeout) must still run the `finally`s that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(THREADS)

    args.cache_dir = Path(os.environ.get("MACE_CACHE_DIR", "~/.cache/mace")).expanduser()
    args.model_dir_given = args.model_dir is not None
    if args.model_dir is None:
        from mace.model import smollm2

        args.model_dir = smollm2.prepare(args.cache_dir)  # converts once (~30 s), later instant
    args.model_dir = args.model_dir.resolve()
    levels, new_tokens, sequential_n = ([4, 8], 16, 2) if args.quick else ([8, 32], NEW_TOKENS, 4)
    print(f"model {args.model_dir}, {new_tokens} new tokens/request, greedy, EOS ignored, "
          f"{THREADS} torch threads, levels {levels}", file=sys.stderr, flush=True)

    rows: dict[str, dict[int, Cell]] = {}
    overhead = "n/a"
    contention = CpuContention()
    print("running mace serve ...", file=sys.stderr, flush=True)
    try:
        rows["mace serve"], overhead = run_mace(args, levels, new_tokens)
    except Exception as exc:
        traceback.print_exc()
        rows["mace serve"] = dict.fromkeys(levels, reason(exc))
    if args.skip_transformers_serve:
        rows[TS_NAME] = dict.fromkeys(levels, "skipped (--skip-transformers-serve)")
    else:
        print(f"running {TS_NAME} ...", file=sys.stderr, flush=True)
        try:
            rows[TS_NAME] = run_transformers_serve(args, levels, new_tokens)
        except Exception as exc:
            traceback.print_exc()
            rows[TS_NAME] = dict.fromkeys(levels, reason(exc))
    rows.update(run_in_process(args, levels, new_tokens, sequential_n))

    print()
    print_table(rows, levels)
    print()
    print(f"mace engine overhead (1 - forward/step over the measured requests): {overhead}")
    print(f"machine load during the run: {contention.report()} (if high, rerun on a quiet machine)")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
