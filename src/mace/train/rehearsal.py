"""Rehearsal: the base model's own answers to a few general questions, trained beside users' samples.

A handful of corrections about one fact, trained until they are answered, pull a small adapter
towards saying that fact everywhere: without something to hold the rest in place, most general
answers change. Each optimizer step therefore also trains one anchor (general question → the base
model's greedy answer), round robin. Its loss is near zero while the adapter leaves general answers
alone, so it costs little gradient then, and rises exactly when the adapter starts to overwrite them.

Anchors are generated once per model and dtype by greedy decoding with the base weights, at the
trainer's start, and cached in the data dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from mace.train.replay import TrainSample

log = structlog.get_logger(__name__)

ANCHOR_QUESTIONS = (
    "What is the capital of Germany?",
    "Explain what a computer does in one sentence.",
    "Give me a tip for staying healthy.",
    "What is the largest planet in our solar system?",
    "How do plants get energy?",
    "Write one sentence about the ocean.",
    "What is 12 times 12?",
    "Who was Albert Einstein?",
)
ANCHOR_ANSWER_TOKENS = 24
FIRST_ANCHOR_ID = -1000  # anchors are not journal samples: negative ids, never marked trained


def anchors(causal_lm: Any, tokenizer: Any, cache_path: Path, model_key: str) -> list[TrainSample]:
    """The anchors for this model (from the cache when `model_key` matches), as training samples."""
    cached = _read(cache_path, model_key)
    if cached is None:
        started = time.perf_counter()
        cached = [_generate(causal_lm, tokenizer, question) for question in ANCHOR_QUESTIONS]
        _write(cache_path, model_key, cached)
        log.info("rehearsal anchors generated", num=len(cached), seconds=round(time.perf_counter() - started, 2))
    return [TrainSample(FIRST_ANCHOR_ID - index, [*prompt, *answer], len(prompt), created_at=0.0)
            for index, (prompt, answer) in enumerate(cached)]


@torch.no_grad()
def _generate(causal_lm: Any, tokenizer: Any, question: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    device = causal_lm.lm_head.weight.device
    output = causal_lm.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=ANCHOR_ANSWER_TOKENS,
                                do_sample=False, attention_mask=torch.ones(1, len(prompt_ids), device=device),
                                pad_token_id=tokenizer.eos_token_id)
    return prompt_ids, output[0, len(prompt_ids):].tolist()


def _read(path: Path, model_key: str) -> list[tuple[list[int], list[int]]] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("model") != model_key or stored.get("questions") != list(ANCHOR_QUESTIONS):
        return None
    return [(list(prompt), list(answer)) for prompt, answer in stored["anchors"]]


def _write(path: Path, model_key: str, anchors: list[tuple[list[int], list[int]]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": model_key, "questions": list(ANCHOR_QUESTIONS), "anchors": anchors}))
        tmp.replace(path)
    except OSError as exc:  # a read-only data dir costs a regeneration at the next start, nothing more
        log.warning("rehearsal anchors not cached", error=str(exc))
