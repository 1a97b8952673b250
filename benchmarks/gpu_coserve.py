"""GPU check, one prepared run: decode speed with and without CUDA graphs, against a compiled bare
`transformers` loop, and decode latency with LoRA fine-tuning overlapped (stream priority, or SM
partitioning with green contexts), serialized, and off.

Nothing is downloaded: randomly initialised Llamas are built from configs, the default model's
shape (SmolLM2-135M) and a 1.1B TinyLlama shape, bf16. The mace engine itself runs every mace row.

1. decode tokens/s at each batch size: mace eager, mace with CUDA graphs (`engine.cuda_graphs`),
   and a bare loop (`generate()` with a static cache, torch.compile mode "reduce-overhead");
2. a profile of 20 decode steps with graphs: the device's busy time against the wall, top kernels;
3. co-serving on one model and batch: TPOT with training off, overlapped on the low-priority
   stream, overlapped on a green context of part of the SMs, and serialized on one stream;
   training tokens/s in each, and with no requests at all (training alone); GPU utilisation from
   nvidia-smi, sampled every 100 ms.

Training modes get TPOT targets of `--tpot-ratios` x the measured training-off TPOT; the scheduler
fits training stages into that slack with its latency model. Sections run in that order and stop
starting new work past `--budget-s`, so the run fits its device lease.

    python benchmarks/gpu_coserve.py --out results.json                # on a GPU machine
    python benchmarks/gpu_coserve.py --device cpu --sizes tiny --batches 2 --steps 6   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mace.config import MaceConfig, load_config
from mace.engine.core import EngineCore
from mace.engine.request import Request, SamplingParams
from mace.engine.warmup import warm_up
from mace.logging import configure_logging
from mace.model.loader import ModelBundle
from mace.model.tiny import build_tokenizer
from mace.train.journal import Journal
from mace.train.replay import TrainSample
from mace.train.trainer import Trainer
from mace.train.work import StageKind

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
    "1b": (2048, 5632, 22, 32, 4, 32000, False),  # TinyLlama-1.1B
    "smollm2": (576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M, the default model's shape
    "tiny": (256, 688, 4, 8, 4, 1024, False),
}
GREEN_SM_FRACTION = 0.25  # training's share of the SMs in the green-context mode


@dataclass
class ModeResult:
    name: str
    tpot_ms: list[float] = field(repr=False)
    decode_tok_s: float
    train_tok_s: float
    gpu_util: list[float] = field(repr=False)
    graph_steps: int = 0
    outside_run_ms: float = 0.0  # per step: planning and bookkeeping around `runner.run` (host only)

    @property
    def tpot_p50(self) -> float:
        return statistics.median(self.tpot_ms) if self.tpot_ms else 0.0

    @property
    def tpot_p99(self) -> float:
        if len(self.tpot_ms) < 2:
            return self.tpot_p50
        return statistics.quantiles(self.tpot_ms, n=100)[98]

    @property
    def util(self) -> float | None:
        return statistics.mean(self.gpu_util) if self.gpu_util else None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "tpot_p50_ms": self.tpot_p50, "tpot_p99_ms": self.tpot_p99,
                "decode_tok_s": self.decode_tok_s, "train_tok_s": self.train_tok_s, "gpu_util": self.util,
                "graph_steps": self.graph_steps, "outside_run_ms": self.outside_run_ms}

    def row(self) -> str:
        util = f"{self.util:.0f}%" if self.util is not None else "n/a"
        return (f"| {self.name} | {self.tpot_p50:.2f} | {self.tpot_p99:.2f} | {self.decode_tok_s:.0f} "
                f"| {self.train_tok_s:.0f} | {util} |")


class UtilizationSampler:
    """nvidia-smi's utilization.gpu every 100 ms, on a thread, between start() and stop()."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.samples = []
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
        except FileNotFoundError:
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line.strip()))

    def stop(self) -> list[float]:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return self.samples[1:]  # the first reading covers time before the mode started


def build_bundle(size: str, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    hidden, intermediate, layers, heads, kv_heads, vocab, tied = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=16384, tie_word_embeddings=tied)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return ModelBundle(name=f"random-{size}", causal_lm=model, tokenizer=build_tokenizer(), device=device,
                       dtype=dtype, eos_token_ids=frozenset(), max_position=16384)


def mode_config(args: argparse.Namespace, data_dir: Path, batch: int, policy: str, overlap: bool, tpot_s: float,
                graphs: bool) -> MaceConfig:
    return load_config(None, {
        "data_dir": str(data_dir), "cache_dir": str(data_dir / "cache"),
        "model": {"device": args.device,
                  "max_model_len": max(256, args.prompt_tokens + args.steps + args.warmup + 8)},
        "engine": {"max_num_seqs": max(batch, 1), "max_num_batched_tokens": max(512, batch * args.prompt_tokens),
                   "overlap_streams": overlap, "cuda_graphs": graphs},
        "memory": {"budget_bytes": args.kv_gib * 1024**3},
        "slo": {"tpot_s": tpot_s, "ttft_s": 10.0},
        "train": {"policy": policy, "max_sample_tokens": args.sample_tokens, "batch_size": 4,
                  "checkpoint_interval_s": 1e9},
    }, environ={})


def run_mode(name: str, bundle: ModelBundle, config: MaceConfig, trainer: Trainer | None, batch: int,
             args: argparse.Namespace, green: bool = False) -> ModeResult:
    """`batch` greedy requests decoding together (0: none, training alone) for `args.steps` steps."""
    engine = EngineCore(bundle, config, trainer)
    if green:
        engine.runner.streams.partition_training(GREEN_SM_FRACTION)
    warm_up(engine)  # as `mace serve` does before it is ready: the latency model learns this machine
    vocab = bundle.causal_lm.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    for index in range(batch):
        prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist()
        engine.scheduler.add_request(Request(
            request_id=f"{name}-{index}", prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=args.warmup + args.steps + 4, temperature=0, ignore_eos=True),
            eos_token_ids=frozenset(), max_model_len=engine.max_model_len, arrival_time_s=time.monotonic(),
        ))
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(args.warmup):  # the latency model learns this machine, kernels warm up
        engine.step()
    engine.runner.streams.synchronize()
    static = engine.runner.static_decode
    graph_steps_before = static.num_steps if static is not None else 0
    sampler = UtilizationSampler()
    sampler.start()
    step_total_before, run_total_before = engine.step_time_s_total, engine.forward_time_s_total
    step_ms: list[float] = []
    decode_tokens = train_layer_tokens = 0
    started = time.perf_counter()
    for _ in range(args.steps):
        step_started = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - step_started) * 1000)
        plan = engine.last_plan
        assert plan is not None
        decode_tokens += plan.num_decode_tokens
        if plan.train is not None:
            train_layer_tokens += plan.train.num_tokens(StageKind.FORWARD, StageKind.BACKWARD)
    outside_run_ms = ((engine.step_time_s_total - step_total_before) - (engine.forward_time_s_total - run_total_before)
                      ) / args.steps * 1000
    engine.runner.streams.synchronize()
    elapsed = time.perf_counter() - started
    util = sampler.stop()
    num_layers = bundle.causal_lm.config.num_hidden_layers
    # A sample-token trained = its forward and backward through every layer.
    train_tok_s = train_layer_tokens / (2 * num_layers) / elapsed
    for request in list(engine.scheduler.running):
        engine.scheduler.abort_request(request.request_id)
    graph_steps = (static.num_steps - graph_steps_before) if static is not None else 0
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ModeResult(name, step_ms if batch else [], decode_tokens / elapsed, train_tok_s, util, graph_steps,
                      outside_run_ms)


def bare_compiled_loop(bundle: ModelBundle, batch: int, args: argparse.Namespace) -> float:
    """Decode tokens/s of `generate()` with a static cache, compiled ("reduce-overhead": CUDA graphs)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    model = bundle.causal_lm
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(bundle.device)
    new_tokens = args.steps

    def generate(count: int) -> float:
        config = GenerationConfig(max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                  cache_implementation="static", pad_token_id=0,
                                  compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    generate(new_tokens)  # compiles and captures
    short = generate(2)  # prefill and the first token: taken out below
    full = generate(new_tokens)
    return batch * (new_tokens - 2) / max(full - short, 1e-9)


def fill_replay(trainer: Trainer, vocab: int, args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(2)
    for sample_id in range(1, 65):
        ids = torch.randint(3, vocab, (args.sample_tokens,), generator=generator).tolist()
        trainer.replay.add(TrainSample(sample_id, ids, args.sample_tokens * 3 // 4, time.time(), loss=5.0))
    trainer.drift.observe(5.0)  # nothing published yet: full drift, the policy trains with all the slack


@contextmanager
def fresh_trainer(bundle: ModelBundle, config: MaceConfig, args: argparse.Namespace) -> Iterator[Trainer]:
    """A trainer of its own per mode, as a server starts with (warm-up expects one that never trained),
    its replay full of samples at full drift; its LoRA layers come off the model at the end."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(config.data_dir / "journal.sqlite3", config.train.heldout_every)
    trainer = Trainer(bundle.causal_lm, bundle.tokenizer, journal, config)
    try:
        fill_replay(trainer, bundle.causal_lm.config.vocab_size, args)
        yield trainer
    finally:
        trainer.close()
        trainer.learner.peft_model.unload()
        journal.close()


class Report:
    """Tables printed as each row lands, and everything in one JSON file at the end."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"decode": [], "coserve": [], "skipped": []}

    def in_budget(self, what: str) -> bool:
        if time.monotonic() - self.started < self.budget_s:
            return True
        self.data["skipped"].append(what)
        print(f"skipped (past the budget): {what}", flush=True)
        return False


def decode_section(args: argparse.Namespace, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    print("\n| model | batch | mace eager tok/s | mace graphs tok/s | graphs / eager | graph steps "
          "| outside run, ms/step |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for size in args.sizes:
        bundle = build_bundle(size, device, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            for batch in args.batches:
                if not report.in_budget(f"decode {size} batch {batch}"):
                    return
                modes = {}
                for graphs in (False, True):
                    config = mode_config(args, Path(tmp), batch, "none", True, 10.0, graphs)
                    try:
                        modes[graphs] = run_mode("graphs" if graphs else "eager", bundle, config, None, batch, args)
                    except Exception as error:  # one failed row must not lose the lease's other figures
                        traceback.print_exc()
                        report.data["skipped"].append(f"decode {size} {batch} graphs={graphs}: {error!r}")
                if len(modes) < 2:
                    continue
                eager, graphs_mode = modes[False], modes[True]
                row = {"model": size, "batch": batch, "eager_tok_s": eager.decode_tok_s,
                       "graphs_tok_s": graphs_mode.decode_tok_s, "eager_tpot_p50_ms": eager.tpot_p50,
                       "graphs_tpot_p50_ms": graphs_mode.tpot_p50, "graph_steps": graphs_mode.graph_steps,
                       "graphs_outside_run_ms": graphs_mode.outside_run_ms}
                report.data["decode"].append(row)
                print(f"| {size} | {batch} | {eager.decode_tok_s:.0f} | {graphs_mode.decode_tok_s:.0f} "
                      f"| {graphs_mode.decode_tok_s / eager.decode_tok_s:.2f}x | {graphs_mode.graph_steps} "
                      f"| {graphs_mode.outside_run_ms:.2f} |", flush=True)
        del bundle
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def profile_section(args: argparse.Namespace, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    """Where a decode step's time goes (the first size, batch `--coserve-batch`, graphs on): torch's
    profiler over 20 steps, the device's busy time against the wall, and the top device kernels."""
    size, batch = args.sizes[0], args.coserve_batch
    if not report.in_budget(f"profile {size} batch {batch}"):
        return
    from torch.profiler import ProfilerActivity, profile

    bundle = build_bundle(size, device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        config = mode_config(args, Path(tmp), batch, "none", True, 10.0, device.type == "cuda")
        engine = EngineCore(bundle, config)
        warm_up(engine)
        generator = torch.Generator().manual_seed(4)
        for index in range(batch):
            prompt = torch.randint(3, bundle.causal_lm.config.vocab_size, (args.prompt_tokens,), generator=generator)
            engine.scheduler.add_request(Request(
                request_id=f"profile-{index}", prompt_token_ids=prompt.tolist(),
                sampling_params=SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
                eos_token_ids=frozenset(), max_model_len=engine.max_model_len, arrival_time_s=time.monotonic()))
        for _ in range(12):  # prefill, then a few decodes
            engine.step()
        with profile(activities=activities) as profiler:
            started = time.perf_counter()
            for _ in range(20):
                engine.step()
            wall_s = time.perf_counter() - started
    device_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # On CUDA the kernels themselves (graph replays' included), not the host ops that launched them.
    events = [event for event in profiler.key_averages()
              if device.type != "cuda" or event.device_type.name == "CUDA"]
    busy_us = sum(getattr(event, device_attr) for event in events)
    top = sorted(events, key=lambda event: getattr(event, device_attr), reverse=True)[:12]
    rows = [{"name": event.key, "self_us_per_step": getattr(event, device_attr) / 20,
             "count_per_step": event.count / 20} for event in top]
    report.data["profile"] = {"model": size, "batch": batch, "wall_ms_per_step": wall_s / 20 * 1000,
                              "device_busy_ms_per_step": busy_us / 20 / 1000, "top": rows}
    print(f"\nprofile {size}, batch {batch}: {wall_s / 20 * 1000:.2f} ms a step, device busy "
          f"{busy_us / 20 / 1000:.2f} ms of it ({'CUDA kernels' if device.type == 'cuda' else 'CPU ops'})", flush=True)
    print("| op | self us / step | calls / step |\n|---|---|---|", flush=True)
    for row in rows:
        print(f"| {row['name'][:70]} | {row['self_us_per_step']:.1f} | {row['count_per_step']:.1f} |", flush=True)


def coserve_section(args: argparse.Namespace, report: Report, device: torch.device,
                    dtype: torch.dtype) -> list[ModeResult]:
    size, batch = args.coserve_size, args.coserve_batch
    if not report.in_budget(f"co-serving {size} batch {batch}"):
        return []
    bundle = build_bundle(size, device, dtype)
    results: list[ModeResult] = []
    graphs = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        off = run_mode("off", bundle, mode_config(args, data_dir, batch, "none", True, 10.0, graphs), None, batch, args)
        results.append(off)
        modes: list[tuple[str, bool, bool, int, float]] = []
        for ratio in args.tpot_ratios:
            modes.append((f"overlapped @{ratio:g}x", True, False, batch, ratio))
            modes.append((f"serialized @{ratio:g}x", False, False, batch, ratio))
        modes.append(("training-alone", True, False, 0, args.tpot_ratios[0]))
        if device.type == "cuda":  # last: a beta API that may fail in ways the other modes should not share
            modes += [(f"overlapped-green @{ratio:g}x", True, True, batch, ratio) for ratio in args.tpot_ratios]
        print(f"\nco-serving {size}, batch {batch}: training-off TPOT p50 {off.tpot_p50:.2f} ms; TPOT targets "
              + ", ".join(f"{off.tpot_p50 * ratio:.2f} ms" for ratio in args.tpot_ratios), flush=True)
        for index, (name, overlap, green, mode_batch, ratio) in enumerate(modes):
            if not report.in_budget(f"co-serving mode {name}"):
                break
            config = mode_config(args, data_dir / f"mode{index}", batch, "mace", overlap,
                                 off.tpot_p50 / 1000 * ratio, graphs)
            try:
                with fresh_trainer(bundle, config, args) as trainer:
                    results.append(run_mode(name, bundle, config, trainer, mode_batch, args, green=green))
            except Exception as error:  # green contexts: not in every torch or driver
                traceback.print_exc()
                print(f"{name}: unavailable ({type(error).__name__}: {error})", flush=True)
                report.data["skipped"].append(f"{name}: {type(error).__name__}: {error}")
    print("\n| mode | TPOT p50 (ms) | TPOT p99 (ms) | decode tok/s | train tok/s | GPU util |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for result in results:
        print(result.row(), flush=True)
        report.data["coserve"].append(result.summary())
    alone = next((r for r in results if r.name == "training-alone"), None)
    for result in results[1:]:
        if result.tpot_ms:
            share = f", training {result.train_tok_s / alone.train_tok_s:.0%} of alone" if alone and \
                alone.train_tok_s else ""
            print(f"{result.name}: TPOT p50 {result.tpot_p50 / off.tpot_p50:.2f}x training-off{share}", flush=True)
    return results


def bare_section(args: argparse.Namespace, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        return
    print("\n| model | batch | bare compiled loop tok/s |", flush=True)
    print("|---|---|---|", flush=True)
    order = sorted(args.batches, key=lambda batch: (batch != 8, batch))  # batch 8 first: the target's
    report.data["bare"] = []
    for size in args.sizes:
        bundle = build_bundle(size, device, dtype)
        for batch in order:
            if not report.in_budget(f"bare loop {size} batch {batch}"):
                break
            try:
                tok_s = bare_compiled_loop(bundle, batch, args)
            except Exception as error:
                print(f"bare loop {size} batch {batch}: failed ({type(error).__name__}: {error})", flush=True)
                report.data["skipped"].append(f"bare {size} {batch}: {type(error).__name__}: {error}")
                continue
            report.data["bare"].append({"model": size, "batch": batch, "tok_s": tok_s})
            print(f"| {size} | {batch} | {tok_s:.0f} |", flush=True)
        del bundle
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["1b", "smollm2"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--coserve-size", choices=sorted(SIZES), default=None, help="default: the first size")
    parser.add_argument("--coserve-batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--sample-tokens", type=int, default=2048, help="tokens per training sample")
    parser.add_argument("--steps", type=int, default=200, help="measured decode steps per mode")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--tpot-ratios", type=float, nargs="+", default=[1.15],
                        help="training modes' TPOT targets / training-off TPOT (one co-serving table each)")
    parser.add_argument("--kv-gib", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=400, help="start no new measurement after this")
    parser.add_argument("--sections", nargs="+", choices=["decode", "profile", "coserve", "bare"],
                        default=["decode", "profile", "coserve", "bare"])
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    args.coserve_size = args.coserve_size or args.sizes[0]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.dtype}; {args.steps} steps per mode; training samples "
          f"of {args.sample_tokens} tokens", flush=True)
    report = Report(args.budget_s)
    report.data["device"] = name
    report.data["torch"] = torch.__version__
    if "decode" in args.sections:
        decode_section(args, report, device, dtype)
    if "profile" in args.sections:
        profile_section(args, report, device, dtype)
    if "coserve" in args.sections:
        coserve_section(args, report, device, dtype)
    if "bare" in args.sections:
        bare_section(args, report, device, dtype)
    report.data["elapsed_s"] = time.monotonic() - report.started
    if args.out is not None:
        args.out.write_text(json.dumps(report.data, indent=1, default=lambda value: asdict(value)))
    return report.data


if __name__ == "__main__":
    configure_logging("info", json=False)  # as `mace serve` runs: no per-step debug line inside the timings
    main()
