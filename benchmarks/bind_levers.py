"""Whose fact is it: the training levers measured on binding answers to the user who taught them.

On `make bench-train`'s personalization trace nearly every wrong answer to a question taught before
is another user's value for the same attribute (`benchmarks/trace_ceiling.py --requests`): one shared
adapter learns the answers, but binds them to the user named in the system prompt only partly. This
measures that alone, without a server: mace's learner (`Learner`, the layered micro-step, AdamW) trains
one sample for every fact of the trace's first phase (8 users x 5 attributes, each asked under its first
phrasing, with the trace's system prompt naming the user), highest loss first as the replay buffer picks
them, and every `--every` optimizer steps asks all of them greedily, under both phrasings. It counts the
answers that are right, and the wrong ones that are another user's value of the same attribute.

    .venv/bin/python benchmarks/bind_levers.py [--steps 60] [--every 10] [--only NAME ...]

Prints a markdown table; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen.metrics import exact_match
from loadgen.personalization import QUESTIONS, SYSTEM, profiles

from learn_levers import run_micro_step
from mace.config import MaceConfig, ModelConfig, TrainConfig
from mace.model.loader import load_model
from mace.train.learner import Learner
from mace.train.replay import TrainSample

USERS = 8  # as the trace has them
ANSWER_TOKENS = 6
UNSCORED = 1e9  # a sample's loss before its first micro-step: the replay buffer picks those first

LEVERS: dict[str, dict[str, Any]] = {
    "shipped (LoRA r 8 on q, v; lr 0.004 easing to 0.002; batch 1)": {},
    "rank 16": {"lora_rank": 16, "lora_alpha": 32},
    "q, k, v, o": {"target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "lr 0.004, constant": {"learning_rate": 4e-3, "fresh_lr_factor": 1.0},
    "batch 8": {"batch_size": 8},
    "MLP (gate, up, down)": {"target_modules": ("gate_proj", "up_proj", "down_proj")},
    "q, v and MLP": {"target_modules": ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")},
}

Fact = tuple[str, str]  # (user, attribute)


def facts() -> dict[Fact, str]:
    """Every user's value of every attribute in the trace's first phase (seed 0)."""
    first = profiles(random.Random("personalization-0"), USERS, 1)[0]
    return {(user, attribute): value for user, values in first.items() for attribute, value in values.items()}


def prompt_ids(tokenizer: Any, user: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM.format(name=user)}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def samples(tokenizer: Any, taught: dict[Fact, str]) -> list[TrainSample]:
    """One sample per fact, its first phrasing, tokenized as the trainer tokenizes feedback."""
    found = []
    for index, ((user, attribute), value) in enumerate(sorted(taught.items())):
        prompt = prompt_ids(tokenizer, user, QUESTIONS[attribute][0])
        answer = [*tokenizer.encode(value, add_special_tokens=False), tokenizer.eos_token_id]
        found.append(TrainSample(index, prompt + answer, len(prompt), created_at=0.0))
    return found


@torch.no_grad()
def answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int = ANSWER_TOKENS) -> list[str]:
    """Greedy answers of one left-padded batch."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def score(model: Any, tokenizer: Any, taught: dict[Fact, str], phrasing: int) -> tuple[int, int]:
    """(right, another user's value of the same attribute) over every fact under `phrasing`."""
    keys = sorted(taught)
    replies = answers(model, tokenizer, [prompt_ids(tokenizer, u, QUESTIONS[a][phrasing]) for u, a in keys])
    right = others = 0
    for (user, attribute), reply in zip(keys, replies, strict=True):
        if exact_match(reply, taught[(user, attribute)]):
            right += 1
        elif any(exact_match(reply, value) for (other, a), value in taught.items() if a == attribute and other != user):
            others += 1
    return right, others


def run_lever(overrides: dict[str, Any], steps: int, every: int) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """Per check: (step, (right, another user's) under the taught phrasing, the same under the other)."""
    bundle = load_model(ModelConfig(name="builtin:smollm2", dtype="float32"), MaceConfig().cache_dir)
    config = TrainConfig(**{**TrainConfig().model_dump(), "max_versions_loaded": 1, **overrides})
    learner = Learner(bundle.causal_lm, config)
    tokenizer, model = bundle.tokenizer, learner.peft_model
    taught = facts()
    batch_pool = samples(tokenizer, taught)
    losses = {s.sample_id: UNSCORED for s in batch_pool}
    checks = []
    for step in range(1, steps + 1):
        batch = sorted(batch_pool, key=lambda s: -losses[s.sample_id])[: config.batch_size]
        for sample, loss in zip(batch, run_micro_step(learner, batch), strict=True):
            losses[sample.sample_id] = loss
        learner.optimizer_step()
        if step % every == 0:
            checks.append((step, score(model, tokenizer, taught, 0), score(model, tokenizer, taught, 1)))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="lever names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    levers = {name: LEVERS[name] for name in args.only} if args.only else LEVERS
    count = len(facts())
    print(f"{USERS} users x {len(QUESTIONS)} attributes = {count} facts, one sample each; "
          f"right / another user's value, taught phrasing | other phrasing (of {count})")
    steps = list(range(args.every, args.steps + 1, args.every))
    print("| lever | " + " | ".join(f"step {step}" for step in steps) + " | seconds |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name, overrides in levers.items():
        started = time.monotonic()
        checks = run_lever(overrides, args.steps, args.every)
        cells = [f"{taught[0]} / {taught[1]} \\| {other[0]} / {other[1]}" for _, taught, other in checks]
        print(f"| {name} | " + " | ".join(cells) + f" | {time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
