"""GPU check: decode latency and GPU utilization with LoRA fine-tuning overlapped on CUDA streams,
serialized on one stream, and off.

Nothing is downloaded: a randomly initialised Llama of a realistic size is built from a config
(default: a 1.1B TinyLlama shape, bf16). The mace engine itself runs each mode on the same decode
workload (a fixed batch of greedy requests, a fixed number of steps):

- off: no trainer.
- overlapped: the `mace` policy at full drift, training stages on the low-priority stream.
- serialized: the same, every kernel on one stream (engine.overlap_streams = false).

Training modes get a TPOT target of `--tpot-ratio` x the measured training-off TPOT; the scheduler
fits training stages into that slack using its latency model, so the modes differ in how much
training the same latency buys. GPU utilization is sampled with nvidia-smi while each mode runs.

    python benchmarks/gpu_coserve.py                                 # on a GPU machine
    python benchmarks/gpu_coserve.py --device cpu --size tiny --steps 6   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mace.config import MaceConfig, load_config
from mace.engine.core import EngineCore
from mace.engine.request import Request, SamplingParams
from mace.model.loader import ModelBundle
from mace.model.tiny import build_tokenizer
from mace.train.intake import held_out_every
from mace.train.journal import Journal
from mace.train.replay import TrainSample
from mace.train.trainer import Trainer
from mace.train.work import StageKind

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "tiny": (256, 688, 4, 8, 4, 1024),
}


@dataclass
class ModeResult:
    name: str
    tpot_ms: list[float]
    decode_tok_s: float
    train_tok_s: float
    gpu_util: list[float]

    def row(self) -> str:
        q = statistics.quantiles(self.tpot_ms, n=100) if len(self.tpot_ms) > 1 else self.tpot_ms * 99
        util = f"{statistics.mean(self.gpu_util):.0f}%" if self.gpu_util else "n/a"
        return (f"| {self.name} | {statistics.median(self.tpot_ms):.2f} | {q[98]:.2f} | {self.decode_tok_s:.0f} "
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
    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=16384, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return ModelBundle(name=f"random-{size}", causal_lm=model, tokenizer=build_tokenizer(), device=device,
                       dtype=dtype, eos_token_ids=frozenset(), max_position=16384)


def mode_config(args: argparse.Namespace, data_dir: Path, policy: str, overlap: bool, tpot_s: float) -> MaceConfig:
    return load_config(None, {
        "data_dir": str(data_dir), "cache_dir": str(data_dir / "cache"),
        "model": {"device": args.device, "max_model_len": args.prompt_tokens + args.steps + args.warmup + 8},
        "engine": {"max_num_seqs": args.batch, "max_num_batched_tokens": max(512, args.batch * args.prompt_tokens),
                   "overlap_streams": overlap},
        "memory": {"budget_bytes": args.kv_gib * 1024**3},
        "slo": {"tpot_s": tpot_s, "ttft_s": 10.0},
        "train": {"policy": policy, "max_sample_tokens": args.sample_tokens, "batch_size": 4,
                  "checkpoint_interval_s": 1e9},
    }, environ={})


def run_mode(name: str, bundle: ModelBundle, config: MaceConfig, trainer: Trainer | None,
             args: argparse.Namespace) -> ModeResult:
    engine = EngineCore(bundle, config, trainer)
    vocab = bundle.causal_lm.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    for index in range(args.batch):
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
    sampler = UtilizationSampler()
    sampler.start()
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
    engine.runner.streams.synchronize()
    elapsed = time.perf_counter() - started
    util = sampler.stop()
    num_layers = bundle.causal_lm.config.num_hidden_layers
    # A sample-token trained = its forward and backward through every layer.
    train_tok_s = train_layer_tokens / (2 * num_layers) / elapsed
    for request in list(engine.scheduler.running):
        engine.scheduler.abort_request(request.request_id)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ModeResult(name, step_ms, decode_tokens / elapsed, train_tok_s, util)


def fill_replay(trainer: Trainer, vocab: int, args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(2)
    for sample_id in range(1, 65):
        ids = torch.randint(3, vocab, (args.sample_tokens,), generator=generator).tolist()
        trainer.replay.add(TrainSample(sample_id, ids, args.sample_tokens * 3 // 4, time.time(), loss=5.0))
    trainer.drift.observe(5.0)  # nothing published yet: full drift, the policy trains with all the slack


def main(argv: list[str] | None = None) -> list[ModeResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=32, help="requests decoding together")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--sample-tokens", type=int, default=2048, help="tokens per training sample")
    parser.add_argument("--steps", type=int, default=300, help="measured decode steps per mode")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--tpot-ratio", type=float, default=1.1, help="training modes' TPOT target / off")
    parser.add_argument("--kv-gib", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    bundle = build_bundle(args.size, device, getattr(torch, args.dtype))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; model {args.size} ({sum(p.numel() for p in bundle.causal_lm.parameters()) / 1e9:.2f}B "
          f"params, {args.dtype}); batch {args.batch}; {args.steps} steps per mode; samples of "
          f"{args.sample_tokens} tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        off = run_mode("off", bundle, mode_config(args, data_dir, "none", True, 10.0), None, args)
        target_s = statistics.median(off.tpot_ms) / 1000 * args.tpot_ratio
        print(f"training-off TPOT p50 {statistics.median(off.tpot_ms):.2f} ms; training modes' TPOT target "
              f"{target_s * 1000:.2f} ms", flush=True)
        train_config = mode_config(args, data_dir, "mace", True, target_s)
        journal = Journal(data_dir / "journal.sqlite3", held_out_every(train_config.train.heldout_every))
        trainer = Trainer(bundle.causal_lm, bundle.tokenizer, journal, train_config)
        fill_replay(trainer, bundle.causal_lm.config.vocab_size, args)
        results = [off]
        for mode, overlap in (("overlapped", True), ("serialized", False)):
            config = mode_config(args, data_dir, "mace", overlap, target_s)
            results.append(run_mode(mode, bundle, config, trainer, args))
        journal.close()
    print("\n| mode | TPOT p50 (ms) | TPOT p99 (ms) | decode tok/s | train tok/s | GPU util |")
    print("|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    base = statistics.median(off.tpot_ms)
    for result in results[1:]:
        print(f"{result.name}: TPOT p50 {statistics.median(result.tpot_ms) / base:.2f}x training-off")
    return results


if __name__ == "__main__":
    main()
