"""The quality guard for a lower-precision dtype: does it answer as the fp32 model does?

Two measures against the same weights in fp32: the share of greedy answer tokens that agree,
position by position, over `PROMPTS` served through the engine (a divergence costs every token
after it), and the perplexity of `HELD_OUT_TEXT`. Used by the serving benchmark and a slow test.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mace.engine.request import SamplingParams

if TYPE_CHECKING:
    from mace.engine.frontend import AsyncEngine
    from mace.model.loader import ModelBundle

_SUBJECTS = ("the moon", "bread", "a bicycle", "the ocean", "a violin", "coffee", "a volcano", "the internet",
             "a honeybee", "winter")
_ASKS = ("What is {}?", "Give one fact about {}.", "Write a short sentence about {}.",
         "Why do people like {}?", "Describe {} in three words.")
PROMPTS = tuple(ask.format(subject) for subject in _SUBJECTS for ask in _ASKS)  # 50 prompts

HELD_OUT_TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel, and the baker opened his "
    "shutters to the smell of rye. Children ran along the stone wall that kept the spring floods out of the "
    "market square, and an old man sat on the bench by the bridge, counting the barges that passed. By noon "
    "the square was full: farmers sold apples and cheese, a tinker mended pots, and a girl with a fiddle "
    "played the same three tunes over and over until someone paid her to stop. In the evening the wind "
    "turned cold, the lamps were lit one by one, and the town went quiet again under a sky full of stars."
)


@dataclass(frozen=True)
class QualityReport:
    token_agreement: float  # share of answer positions where the candidate's greedy token equals fp32's
    reference_perplexity: float
    candidate_perplexity: float

    @property
    def perplexity_change(self) -> float:
        """Relative change of the held-out perplexity (0.01 is 1%)."""
        return self.candidate_perplexity / self.reference_perplexity - 1


async def greedy_answers(engine: AsyncEngine, max_tokens: int) -> list[list[int]]:
    """`PROMPTS`, chat-templated, served together to the end; the engine is started and shut down here."""
    tokenizer = engine.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for text in PROMPTS]

    async def one(ids: list[int]) -> list[int]:
        tokens: list[int] = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async for delta in engine.generate(list(ids), params):
            tokens.extend(delta.new_token_ids)
        return tokens

    engine.start()
    try:
        return list(await asyncio.gather(*(one(ids) for ids in prompts)))
    finally:
        engine.shutdown()


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    total = sum(len(answer) for answer in reference)
    same = sum(a == b for ref, cand in zip(reference, candidate, strict=True) for a, b in zip(ref, cand, strict=False))
    return same / total if total else 1.0


@torch.inference_mode()
def perplexity(bundle: ModelBundle, text: str = HELD_OUT_TEXT) -> float:
    ids = torch.tensor([bundle.tokenizer.encode(text)], device=bundle.device)
    logits = bundle.causal_lm(input_ids=ids).logits[0, :-1].float()  # [T-1, vocab]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(loss.item())
