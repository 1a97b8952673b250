"""Rehearsal: the served base model's own answers to a few general questions, trained beside users' samples.

A handful of corrections about one fact, trained until they are answered, pull a small adapter
towards saying that fact everywhere: without something to hold the rest in place, most general
answers change. Each optimizer step therefore also trains one anchor (general question → the answer
version 0 serves, greedy), round robin. Its loss is near zero while the adapter leaves general answers
alone, so it costs little gradient then, and rises exactly when the adapter starts to overwrite them.

The engine generates the anchors once per model and dtype, as a warm-up round (engine/warmup.py:
the same batched greedy decode users get), and the trainer caches them in the data dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

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

AnchorPair = tuple[list[int], list[int]]  # (prompt tokens, answer tokens)


def anchor_prompts(tokenizer: Any) -> list[list[int]]:
    """The anchor questions as chat prompts, tokenized as a served request's would be."""
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=False) for question in ANCHOR_QUESTIONS]
    return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]


class AnchorStore:
    """The anchors of one model, kept in a JSON file so that only the first start generates them."""

    def __init__(self, path: Path, model_key: str) -> None:
        self.path = path
        self.model_key = model_key
        self.samples: list[TrainSample] = _samples(_read(path, model_key) or [])

    def set(self, pairs: list[AnchorPair]) -> None:
        self.samples = _samples(pairs)
        _write(self.path, self.model_key, pairs)


def anchor_index(anchor: TrainSample) -> int:
    """The index in `ANCHOR_QUESTIONS` of the question `anchor` answers."""
    return FIRST_ANCHOR_ID - anchor.sample_id


def _samples(pairs: list[AnchorPair]) -> list[TrainSample]:
    return [TrainSample(FIRST_ANCHOR_ID - index, [*prompt, *answer], len(prompt), created_at=0.0)
            for index, (prompt, answer) in enumerate(pairs) if answer]


def _read(path: Path, model_key: str) -> list[AnchorPair] | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("model") != model_key or stored.get("questions") != list(ANCHOR_QUESTIONS):
        return None
    return [(list(prompt), list(answer)) for prompt, answer in stored["anchors"]]


def _write(path: Path, model_key: str, anchors: list[AnchorPair]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: servers sharing the data dir may warm up at the same moment.
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".rehearsal-")
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"model": model_key, "questions": list(ANCHOR_QUESTIONS), "anchors": anchors}))
        os.replace(name, path)
    except OSError as exc:  # a read-only data dir costs a regeneration at the next start, nothing more
        log.warning("rehearsal anchors not cached", error=str(exc))
