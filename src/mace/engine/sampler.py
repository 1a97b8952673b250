"""Per-request sampling of the next token from a batch of logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from mace.engine.request import SamplingParams


class Sampler:
    """Keeps one torch.Generator per seeded request so its samples repeat across runs."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits: [batch, vocab] -> one token id per row."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if not p.is_greedy:
                tokens[row] = self._sample_row(logits[row], request_id, p)
        return tokens

    def _sample_row(self, row_logits: torch.Tensor, request_id: str, params: SamplingParams) -> int:
        scores = row_logits.float() / params.temperature  # [vocab]
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token once the tokens before it already cover top_p; the best token always stays.
            drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= params.top_p
            # Said outright: a top_p below float32's range (1e-311) rounds to 0 against the scores.
            drop_sorted[0] = False
            scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, params, probs.device)).item())

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
            self._generators[request_id] = generator
        return generator
