"""Loads the model and tokenizer named by the config: a builtin or a local Hugging Face checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mace import threads
from mace.config import ModelConfig
from mace.model import linear_layout, smollm2, tiny

log = structlog.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# CPU flags (as /proc/cpuinfo names them) under which oneDNN runs bf16 matmuls in hardware; without
# them bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


class ModelLoadError(RuntimeError):
    """The model cannot be loaded or is not an architecture the engine runs."""


@dataclass
class ModelBundle:
    name: str
    causal_lm: Any  # a Hugging Face *ForCausalLM: submodules are dynamic attributes
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_position: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the device computes it natively (measured faster there from batch 1 up on
    the default model), else fp32."""
    if name != "auto":
        return DTYPES[name]
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else bool(cpu_flags() & BF16_CPU_FLAGS)
    dtype = torch.bfloat16 if fast else torch.float32
    log.info("dtype auto", device=device.type, dtype=str(dtype).removeprefix("torch."))
    return dtype


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, empty where /proc/cpuinfo is not there (then `auto` picks fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def load_model(config: ModelConfig, cache_dir: Path) -> ModelBundle:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.name == "builtin:tiny":
        tokenizer = tiny.build_tokenizer()
        model: Any = tiny.build_model(len(tokenizer), config.seed, dtype)
    else:
        path = smollm2.prepare(cache_dir) if config.name == "builtin:smollm2" else Path(config.name)
        model, tokenizer = _load_checkpoint(path, dtype)
    _check_architecture(model)
    model.to(device).eval()
    if device.type == "cpu" and config.linear_layout != "standard":
        cores = threads.engine_threads(config.num_threads)
        linear_layout.apply(model, config.linear_layout, {cores, threads.split(cores)[0]})
    return ModelBundle(
        name=config.name,
        causal_lm=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=_eos_token_ids(model, tokenizer),
        max_position=int(model.config.max_position_embeddings),
    )


def _load_checkpoint(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {str(path)!r} is neither builtin:smollm2, builtin:tiny nor a local Hugging Face "
            "checkpoint directory (no config.json there)"
        )
    log.info("loading model", path=str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _check_architecture(model: Any) -> None:
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj"):
        raise ModelLoadError(
            f"{type(model).__name__} is not a Llama-architecture decoder; the engine runs Llama-family models"
        )


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    return frozenset(ids)
