"""The real default model: converted once from the wheel's GGUF, then loaded from safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mace.engine.frontend import AsyncEngine
from mace.engine.request import SamplingParams
from mace.model import smollm2
from mace.model.loader import load_model
from tests.conftest import tiny_config


def shared_cache_dir() -> Path:
    """The user's cache (as `make serve` uses), so the one-time conversion is shared across runs."""
    return Path(os.environ.get("MACE_CACHE_DIR", "~/.cache/mace")).expanduser()


@pytest.mark.slow
def test_prepare_converts_once_to_safetensors() -> None:
    path = smollm2.prepare(shared_cache_dir())
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert smollm2.prepare(shared_cache_dir()) == path  # second call reuses the checkpoint
    assert not any(p.name.startswith(".") for p in shared_cache_dir().iterdir()), "staging dir left behind"


@pytest.mark.slow
async def test_default_model_answers_paris(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, model={"name": "builtin:smollm2"}, cache_dir=str(shared_cache_dir()))
    bundle = load_model(config.model, config.cache_dir)
    engine = AsyncEngine(bundle, config)
    rendered = bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = bundle.tokenizer.encode(rendered, add_special_tokens=False)
    engine.start()
    try:
        text = ""
        async for delta in engine.generate(ids, SamplingParams(max_tokens=24, temperature=0)):
            text += delta.text
    finally:
        engine.shutdown()
    assert "Paris" in text
