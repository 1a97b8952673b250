"""How one tenant's lineage learns its four facts, in optimizer steps: the pick of each step's samples.

On the tenants trace (loadgen/tenants.py) a tenant asks four questions that differ in one or two
words ("What is my cat called?", "What city do I live in?", ...), under the same system prompt, and
teaches their answers one at a time. A lineage trained one sample per optimizer step can learn the
shortcut of answering every question with the last answer it was taught: the four prompts share almost
every token, and a step on one of them moves the answer of all of them. This measures, without a
server and without the machine's load, mace's own learner (`Learner`, the layered micro-step, AdamW,
the lineage's fresh learning rate) and replay buffer (`ReplayBuffer.pick`, by loss, with its revisits)
on one tenant's facts as the trace teaches them: a new fact every `--every` optimizer steps, each
taught by one sample and then once more by a repeat. After every optimizer step it asks the four
questions greedily; a row gives the step at which every fact taught so far was answered, the steps on
which one answer was given to two or more questions (the shortcut), and the training tokens spent.

    python benchmarks/tenant_facts.py [--every 4] [--max-steps 48] [--tenants 4]

Each row is one way of choosing a step's samples (`PICKS`); each runs `--tenants` tenants' facts (the
trace's own draws, seed 0), each on a fresh learner. Prints a markdown table; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen.metrics import exact_match
from loadgen.tenants import ATTRIBUTES, facts, question

from bind_levers import answers
from learn_levers import run_micro_step
from mace.config import MaceConfig, ModelConfig, TrainConfig
from mace.model.loader import load_model
from mace.train.learner import Learner
from mace.train.replay import ReplayBuffer, TrainSample

MAX_ANSWER_TOKENS = 8


@dataclass
class Outcome:
    all_answered_at: list[int | None] = field(default_factory=list)  # per tenant: every fact taught answered
    final_right: list[int] = field(default_factory=list)  # per tenant: facts answered after the last step
    shortcut_steps: int = 0  # steps after which one answer was given to two or more questions
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def pick_one(replay: ReplayBuffer, now_s: float) -> list[TrainSample]:
    """The shipped pick: the replay buffer's highest-value sample (batch 1)."""
    batch = replay.pick(512, now_s, 1, at_least_one=True)
    return batch.samples if batch else []


def pick_distinct(replay: ReplayBuffer, now_s: float, most: int = 4) -> list[TrainSample]:
    """The highest-value sample of every distinct prompt in the window (up to `most`), in one step."""
    ranked = sorted(replay.newest(len(replay)), key=lambda s: replay.value(s, now_s), reverse=True)
    chosen: dict[tuple[int, ...], TrainSample] = {}
    for sample in ranked:
        chosen.setdefault(sample.prompt_key, sample)
    return list(chosen.values())[:most]


PICKS = {
    "one sample a step, by loss (shipped)": pick_one,
    "every taught question a step (its highest-loss sample)": pick_distinct,
}


def run_tenant(dtype: str, config: TrainConfig, tenant_facts: dict[str, str], pick: Any, every: int,
               max_steps: int, outcome: Outcome) -> None:
    bundle = load_model(ModelConfig(name="builtin:smollm2", dtype=dtype), MaceConfig().cache_dir)  # type: ignore[arg-type]
    learner = Learner(bundle.causal_lm, config)
    tokenizer, model = bundle.tokenizer, learner.peft_model
    replay = ReplayBuffer(config.replay_window, config.freshness_half_life_s)
    order = list(ATTRIBUTES)
    prompts = {attribute: render(tokenizer, question(attribute)) for attribute in order}
    eos = tokenizer.eos_token_id
    taught: list[str] = []
    next_id = 0

    def teach(attribute: str) -> None:
        nonlocal next_id
        answer = [*tokenizer.encode(tenant_facts[attribute], add_special_tokens=False), eos]
        replay.add(TrainSample(next_id, prompts[attribute] + answer, len(prompts[attribute]), created_at=time.time()))
        next_id += 1

    answered_at = None
    right = 0
    for step in range(max_steps):
        if step % every == 0 and step // every < 2 * len(order):
            position = step // every  # the first pass teaches each fact, the second repeats it
            attribute = order[position % len(order)]
            teach(attribute)
            if attribute not in taught:
                taught.append(attribute)
        batch = pick(replay, time.time())
        started = time.perf_counter()
        for sample, loss in zip(batch, run_micro_step(learner, batch), strict=True):
            sample.loss, sample.num_trained = loss, sample.num_trained + 1
        learner.optimizer_step()
        outcome.seconds += time.perf_counter() - started
        outcome.tokens += sum(sample.num_tokens for sample in batch)
        outcome.steps += 1
        said = [text.strip() for text in answers(model, tokenizer, [prompts[attribute] for attribute in taught],
                                                 MAX_ANSWER_TOKENS)]
        hits = [exact_match(text, tenant_facts[attribute]) for text, attribute in zip(said, taught, strict=True)]
        right = sum(hits)
        if len(taught) == len(order) and all(hits) and answered_at is None:
            answered_at = step + 1
        if len(said) >= 2 and len({text.lower() for text in said}) < len(said):
            outcome.shortcut_steps += 1
    outcome.all_answered_at.append(answered_at)
    outcome.final_right.append(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=4, help="optimizer steps between two taught samples")
    parser.add_argument("--max-steps", type=int, default=48)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--only", action="append", default=[], help="run only this pick (repeatable)")
    args = parser.parse_args()
    config = TrainConfig(**{**TrainConfig().model_dump(), "max_versions_loaded": 1})
    history = facts(random.Random("tenants-0"), 16, 1)[0]
    tenants = sorted(history)[: args.tenants]
    print(f"{len(tenants)} tenants' four facts, a new sample every {args.every} optimizer steps (each fact "
          f"taught, then repeated), {args.max_steps} steps; answers greedy, {MAX_ANSWER_TOKENS} tokens.\n")
    print("| pick | every fact answered at step, per tenant | facts answered at the end | steps with one answer "
          "to two questions | training tokens per step | seconds per step |\n|---|---|---|---|---|---|")
    picks = {name: PICKS[name] for name in args.only} if args.only else PICKS
    for name, pick in picks.items():
        outcome = Outcome()
        for tenant in tenants:
            torch.manual_seed(0)
            run_tenant(args.dtype, config, history[tenant], pick, args.every, args.max_steps, outcome)
        reached = ", ".join("-" if at is None else str(at) for at in outcome.all_answered_at)
        print(f"| {name} | {reached} | {sum(outcome.final_right)}/{4 * len(tenants)} | "
              f"{outcome.shortcut_steps}/{outcome.steps} | {outcome.tokens / outcome.steps:.0f} | "
              f"{outcome.seconds / outcome.steps:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
