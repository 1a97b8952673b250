"""KV pruning's quality cost: perplexity of a held-out continuation after the prompt's KV is pruned.

Each text is cut into a long prompt and the continuation that follows it. The runner prefills the
prompt (its SnapKV window scores every prompt token), the prompt's KV is pruned to a share of its
length, and the continuation is teacher-forced one token at a time, as decode steps, over the
pruned KV. Two ways of choosing what survives are compared at the same budget: the engine's
(sinks + a recent window of at least half + the most attended middle) and a plain sliding window
(sinks + recent only, StreamingLLM), which costs nothing to score.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mace.engine.kv_pruning import split_keep
from mace.engine.plan import IterationPlan, KVPrune, ScheduledChunk
from mace.engine.request import Request, SamplingParams
from mace.engine.runner import ModelRunner
from mace.model.loader import ModelBundle

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [ROOT / "docs" / "architecture.md", ROOT / "README.md", Path("/usr/share/common-licenses/GPL-3"),
         Path("/usr/share/common-licenses/Apache-2.0")]
PROMPT_TOKENS = 768
CONTINUATION_TOKENS = 96
SINKS, RECENT = 4, 32
SHARES = (1.0, 0.5, 0.2)


def continuation_nll(bundle: ModelBundle, ids: list[int], share: float, selection: str) -> float:
    """Mean negative log-likelihood of `ids[PROMPT_TOKENS:]` given the prompt's KV pruned to `share`."""
    runner = ModelRunner(bundle.causal_lm, len(ids) + 1, bundle.device)
    runner.kv.enable_importance()
    request = Request("ppl", ids, SamplingParams(max_tokens=1), frozenset(), len(ids) + 1, 0.0)
    nll: list[float] = []
    with torch.inference_mode():
        logits = forward_chunk(runner, request, 0, PROMPT_TOKENS)
        request.num_computed_tokens = PROMPT_TOKENS
        keep = int(PROMPT_TOKENS * share)
        if keep < PROMPT_TOKENS:
            sinks, recent = split_keep(keep, SINKS, RECENT) if selection == "importance" else (SINKS, keep - SINKS)
            runner._prune([KVPrune("ppl", PROMPT_TOKENS, keep, sinks, recent)])
            request.num_pruned_tokens = PROMPT_TOKENS - keep
        for position in range(PROMPT_TOKENS, len(ids)):
            nll.append(-torch.log_softmax(logits, dim=-1)[ids[position]].item())
            if position + 1 < len(ids):
                logits = forward_chunk(runner, request, position, 1)
                request.num_computed_tokens = position + 1
    return sum(nll) / len(nll)


def forward_chunk(runner: ModelRunner, request: Request, start: int, num_tokens: int) -> torch.Tensor:
    """The logits after `num_tokens` tokens of `request` from `start` (the runner's own forward)."""
    chunk = ScheduledChunk(request, start, num_tokens, samples_token=True, is_decode=num_tokens == 1)
    inputs = runner._prepare(IterationPlan(chunks=[chunk]))
    logits = runner._logits(inputs, runner._forward(inputs))
    assert logits is not None
    return logits.values[0]


def held_out_texts(bundle: ModelBundle) -> list[list[int]]:
    needed = PROMPT_TOKENS + CONTINUATION_TOKENS
    texts = []
    for path in TEXTS:
        if path.is_file():
            ids = bundle.tokenizer.encode(path.read_text(), add_special_tokens=False)
            if len(ids) >= needed:
                texts.append(list(ids[:needed]))
    return texts


def print_quality_table(bundle: ModelBundle) -> None:
    texts = held_out_texts(bundle)
    print(f"  {len(texts)} texts, {PROMPT_TOKENS}-token prompts, {CONTINUATION_TOKENS}-token continuations, "
          f"{SINKS} sinks, {RECENT} recent")
    print("  KV kept | perplexity, attention-scored | perplexity, sliding window")
    for share in SHARES:
        row = []
        for selection in ("importance", "window"):
            if share == 1.0 and selection == "window":
                row.append(row[0])
                continue
            nll = [continuation_nll(bundle, ids, share, selection) for ids in texts]
            row.append(math.exp(sum(nll) / len(nll)))
        print(f"  {share:6.0%}  | {row[0]:28.3f} | {row[1]:25.3f}")
