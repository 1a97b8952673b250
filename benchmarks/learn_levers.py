"""The training levers of `make bench-learn`, measured in optimizer steps rather than seconds.

`benchmarks/learn.py` times a fact being learned beside chat on a live server, which mixes two
questions: how much slack training gets, and how much training the fact needs. This answers the
second, without a server and without the machine's load in the figures: mace's own learner
(`Learner`, the layered micro-step, AdamW, the same sample tokenization) trains the same 16 samples
of one new fact, highest loss first as the replay buffer picks them, and after every optimizer step
asks greedily whether the fact is answered. When the first taught question names it, and again when
the training loss reaches the converged floor, it counts how many of the 50 general answers (greedy,
16 tokens) are unchanged against the base model. Both are asked in one fixed batch, so the adapter is
the only difference between the two answers.

    python benchmarks/learn_levers.py                 # every lever, one fresh model each
    python benchmarks/learn_levers.py --only "q, v of the top half"
    python benchmarks/learn_levers.py --trace "rank 16"   # every step of one lever

`--trace` prints, after every optimizer step, the general answers kept next to the teacher-forced
agreement with the base model: over each general prompt's base answer (and over rehearsal's anchors),
the share of answer tokens the adapter still predicts first. One flipped token changes the rest of a
greedy answer; teacher-forced, it counts once, so the agreement says how much of what the model
knew is still there, which is what a publish gate can check with a forward alone.

Prints a markdown table; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learn import FACT_ANSWER, FACT_QUESTIONS, FACT_WORD, GENERAL_MAX_TOKENS, GENERAL_PROMPTS, UNSEEN_QUESTION
from mace.config import MaceConfig, ModelConfig, TrainConfig
from mace.model.loader import load_model
from mace.train.learner import BASE, Learner
from mace.train.rehearsal import ANCHOR_ANSWER_TOKENS, ANCHOR_QUESTIONS
from mace.train.replay import TrainSample

FACT_MAX_TOKENS = 12
UNSCORED = 1e9  # a sample's loss before its first micro-step: the replay buffer picks those first
SAMPLES_PER_QUESTION = 4

# Each lever is a TrainConfig override on top of the shipped defaults (LoRA r 8 on q and v of every
# layer, lr 0.002 eased from twice that over a lineage's first steps, batch 1). Every other lever's
# learning rate is constant (`CONSTANT`), as it was measured before the easing.
EVERY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
CONSTANT: dict[str, Any] = {"fresh_lr_factor": 1.0}
DOWN_TOP_THIRD: dict[str, Any] = {**CONSTANT, "target_modules": ("down_proj",), "lora_layer_fraction": 0.33,
                                  "lora_rank": 16, "lora_alpha": 32, "learning_rate": 4e-3}
LEVERS: dict[str, dict[str, Any]] = {
    "lr 0.004 easing to 0.002 (shipped: LoRA r 8 on q, v of every layer; batch 1)": {},
    "lr 0.002": CONSTANT,
    "lr 0.001": {**CONSTANT, "learning_rate": 1e-3},
    "lr 0.0005": {**CONSTANT, "learning_rate": 5e-4},
    "rehearsal, lr 0.002": {**CONSTANT, "rehearsal": True},
    "rank 4": {**CONSTANT, "lora_rank": 4, "lora_alpha": 8},
    "rank 16": {**CONSTANT, "lora_rank": 16, "lora_alpha": 32},
    "lr 0.004": {**CONSTANT, "learning_rate": 4e-3},
    "rank 16, lr 0.004": {**CONSTANT, "lora_rank": 16, "lora_alpha": 32, "learning_rate": 4e-3},
    "batch 2 (smaller, more frequent steps)": {**CONSTANT, "batch_size": 2},
    "q, v of the top half": {**CONSTANT, "lora_layer_fraction": 0.5},
    "MLP only (gate, up, down), lr 0.001": {**CONSTANT, "target_modules": MLP, "learning_rate": 1e-3},
    "MLP of the top half": {**CONSTANT, "target_modules": MLP, "lora_layer_fraction": 0.5},
    "down_proj only, lr 0.002": {**CONSTANT, "target_modules": ("down_proj",)},
    "down_proj of the top third, r 16, lr 0.004": DOWN_TOP_THIRD,
    "the same with rehearsal": {**DOWN_TOP_THIRD, "rehearsal": True},
    "down_proj of the top third, r 16, lr 0.002": {**DOWN_TOP_THIRD, "learning_rate": 2e-3},
    "all linear, lr 0.0005": {**CONSTANT, "target_modules": EVERY_LINEAR, "learning_rate": 5e-4},
}


@dataclass
class Result:
    answered_at_step: int | None
    all_taught_at_step: int | None
    unseen_answered: bool
    kept_when_answered: tuple[int, int] | None  # general answers (unchanged, naming the fact)
    converged_at_step: int | None
    kept_when_converged: tuple[int, int] | None
    tokens_per_step: float
    seconds_per_step: float  # the micro-steps and the optimizer step, without the greedy checks
    seconds: float


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def fact_samples(tokenizer: Any) -> list[TrainSample]:
    """The 16 samples as the trainer tokenizes a feedback sample: rendered prompt, answer, EOS."""
    answer = [*tokenizer.encode(FACT_ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
    samples = []
    for index, question in enumerate(q for q in FACT_QUESTIONS for _ in range(SAMPLES_PER_QUESTION)):
        prompt = chat_ids(tokenizer, question)
        samples.append(TrainSample(index, prompt + answer, len(prompt), created_at=0.0))
    return samples


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, questions: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of one left-padded batch: the same shapes for every adapter compared."""
    prompts = [chat_ids(tokenizer, q) for q in questions]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=pad, min_new_tokens=max_tokens)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def anchors(learner: Learner, tokenizer: Any) -> list[TrainSample]:
    """Rehearsal's anchors: the base model's own greedy answers to the anchor questions."""
    with learner.serving([BASE]):
        model = learner.peft_model
        texts = greedy(model, tokenizer, list(ANCHOR_QUESTIONS), ANCHOR_ANSWER_TOKENS)
    return base_pairs(tokenizer, list(ANCHOR_QUESTIONS), texts)


@torch.no_grad()
def agreement(model: Any, pairs: list[TrainSample]) -> float:
    """The share of answer tokens whose teacher-forced top-1 prediction is the base answer's token."""
    agreed = total = 0
    for pair in pairs:
        ids = torch.tensor([pair.token_ids])
        logits = model(input_ids=ids).logits[0, pair.num_prompt_tokens - 1 : -1]
        agreed += int((logits.argmax(-1) == ids[0, pair.num_prompt_tokens :]).sum())
        total += pair.num_tokens - pair.num_prompt_tokens
    return agreed / total


def base_pairs(tokenizer: Any, questions: list[str], answers: list[str]) -> list[TrainSample]:
    samples = []
    for index, (question, text) in enumerate(zip(questions, answers, strict=True)):
        prompt = chat_ids(tokenizer, question)
        samples.append(TrainSample(-1 - index, prompt + tokenizer.encode(text, add_special_tokens=False),
                                   len(prompt), created_at=0.0))
    return samples


def trace(overrides: dict[str, Any], dtype: str, max_steps: int) -> None:
    """One lever, every step: fact answered, general answers kept, teacher-forced agreement."""
    bundle = load_model(ModelConfig(name="builtin:smollm2", dtype=dtype), MaceConfig().cache_dir)  # type: ignore[arg-type]
    config = TrainConfig(**{**TrainConfig().model_dump(), "max_versions_loaded": 1, **overrides})
    learner = Learner(bundle.causal_lm, config)
    tokenizer, model = bundle.tokenizer, learner.peft_model
    with learner.serving([BASE]):
        base_general = greedy(model, tokenizer, GENERAL_PROMPTS, GENERAL_MAX_TOKENS)
    general_pairs = base_pairs(tokenizer, GENERAL_PROMPTS, base_general)
    anchor_pairs = anchors(learner, tokenizer)
    samples = fact_samples(tokenizer)
    losses = {s.sample_id: UNSCORED for s in samples}
    print("| step | first question names the fact | general kept (greedy, of 50) | teacher-forced agreement, "
          "general answers | teacher-forced agreement, anchors | highest sample loss |\n|---|---|---|---|---|---|")
    with learner.serving([BASE]):
        print(f"| 0 | no | {kept(model, tokenizer, base_general)}/50 | {agreement(model, general_pairs):.1%} | "
              f"{agreement(model, anchor_pairs):.1%} | - |", flush=True)
    for step_number in range(1, max_steps + 1):
        batch = sorted(samples, key=lambda s: -losses[s.sample_id])[: config.batch_size]
        for sample, loss in zip(batch, run_micro_step(learner, batch), strict=True):
            losses[sample.sample_id] = loss
        learner.optimizer_step()
        named = FACT_WORD in greedy(model, tokenizer, FACT_QUESTIONS[:1], FACT_MAX_TOKENS)[0]
        highest = max(losses.values())
        print(f"| {step_number} | {'yes' if named else 'no'} | {kept(model, tokenizer, base_general)}/50 | "
              f"{agreement(model, general_pairs):.1%} | {agreement(model, anchor_pairs):.1%} | "
              f"{'-' if highest >= UNSCORED else f'{highest:.3f}'} |", flush=True)
        if max(losses.values()) < config.converged_loss:
            break


def run_micro_step(learner: Learner, samples: list[TrainSample]) -> list[float]:
    step = learner.micro_step(samples)
    while not step.is_done:
        step.run_next()
    learner.accumulated(len(samples))
    return step.losses


def run_lever(overrides: dict[str, Any], dtype: str, max_steps: int, base_general: list[str] | None
              ) -> tuple[Result, list[str]]:
    started = time.monotonic()
    bundle = load_model(ModelConfig(name="builtin:smollm2", dtype=dtype), MaceConfig().cache_dir)  # type: ignore[arg-type]
    config = TrainConfig(**{**TrainConfig().model_dump(), "max_versions_loaded": 1, **overrides})
    learner = Learner(bundle.causal_lm, config)
    tokenizer = bundle.tokenizer
    model = learner.peft_model
    if base_general is None:
        with learner.serving([BASE]):
            base_general = greedy(model, tokenizer, GENERAL_PROMPTS, GENERAL_MAX_TOKENS)
    rehearsal = anchors(learner, tokenizer) if config.rehearsal else []
    samples = fact_samples(tokenizer)
    losses = {s.sample_id: UNSCORED for s in samples}  # unscored samples go first
    result = Result(None, None, False, None, None, None, 0.0, 0.0, 0.0)
    tokens = 0
    training_s = 0.0
    for step_number in range(1, max_steps + 1):
        # The replay buffer's pick: the highest value (loss x weight, all fresh here) first.
        batch = sorted(samples, key=lambda s: -losses[s.sample_id])[: config.batch_size]
        if rehearsal:
            batch.append(rehearsal[step_number % len(rehearsal)])
        step_started = time.perf_counter()
        for sample, loss in zip(batch, run_micro_step(learner, batch), strict=True):
            if sample.sample_id >= 0:
                losses[sample.sample_id] = loss
        tokens += sum(s.num_tokens for s in batch)
        learner.optimizer_step()
        training_s += time.perf_counter() - step_started
        answers = greedy(model, tokenizer, [*FACT_QUESTIONS, UNSEEN_QUESTION], FACT_MAX_TOKENS)
        named = [FACT_WORD in text for text in answers]
        if named[0] and result.answered_at_step is None:
            result.answered_at_step = step_number
            result.kept_when_answered = kept_and_naming(model, tokenizer, base_general)
        if all(named[: len(FACT_QUESTIONS)]) and result.all_taught_at_step is None:
            result.all_taught_at_step = step_number
        result.unseen_answered = named[-1]
        if max(losses.values()) < config.converged_loss:
            result.converged_at_step = step_number
            result.kept_when_converged = kept_and_naming(model, tokenizer, base_general)
            break
    result.tokens_per_step = tokens / step_number
    result.seconds_per_step = training_s / step_number
    result.seconds = time.monotonic() - started
    return result, base_general


def kept(model: Any, tokenizer: Any, base_general: list[str]) -> int:
    return kept_and_naming(model, tokenizer, base_general)[0]


def kept_and_naming(model: Any, tokenizer: Any, base_general: list[str]) -> tuple[int, int]:
    """General answers unchanged against the base model, and general answers that name the taught fact
    (an adapter that answers everything with the fact has learned a shortcut, not the fact)."""
    with torch.no_grad():
        now = greedy(model, tokenizer, GENERAL_PROMPTS, GENERAL_MAX_TOKENS)
    return sum(a == b for a, b in zip(base_general, now, strict=True)), sum(FACT_WORD in text for text in now)


def row(name: str, result: Result, max_steps: int) -> str:
    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    def general(value: tuple[int, int] | None) -> str:
        return "-" if value is None else f"{value[0]}/{len(GENERAL_PROMPTS)} | {value[1]}"

    return (f"| {name} | {cell(result.answered_at_step)} | {cell(result.all_taught_at_step)} | "
            f"{'yes' if result.unseen_answered else 'no'} | {general(result.kept_when_answered)} | "
            f"{cell(result.converged_at_step) if result.converged_at_step else f'not in {max_steps}'} | "
            f"{general(result.kept_when_converged)} | "
            f"{result.tokens_per_step:.0f} | {result.seconds_per_step:.2f} s | {result.seconds:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only this lever (repeatable)")
    parser.add_argument("--dtype", default="auto", help="the model's dtype, as `mace serve --dtype`")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--trace", metavar="LEVER", help="every step of one lever, with teacher-forced agreement")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.trace:
        trace(LEVERS[args.trace], args.dtype, args.max_steps)
        return
    levers = {name: LEVERS[name] for name in args.only} if args.only else LEVERS
    print(f"16 samples of one fact; dtype {args.dtype}; general answers: {len(GENERAL_PROMPTS)} prompts, greedy, "
          f"{GENERAL_MAX_TOKENS} tokens, against the base model in the same batch.\n")
    print("| lever | first question answered at step | all 4 taught at step | unseen paraphrase answered | "
          "general kept then | general naming the fact then | loss under the converged floor at step | "
          "general kept then | general naming the fact then | tokens per step | seconds per step | wall time |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    base_general = None
    for name, overrides in levers.items():
        torch.manual_seed(0)
        result, base_general = run_lever(overrides, args.dtype, args.max_steps, base_general)
        print(row(name, result, args.max_steps), flush=True)


if __name__ == "__main__":
    main()
