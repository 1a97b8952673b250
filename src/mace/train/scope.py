"""Scope: a lineage's versions answer the prompts near what it was taught; the rest get version 0.

A LoRA update that teaches one fact moves near-ties in every answer: most greedy answers to unrelated
questions change a token, then the rest of the answer (docs/results/train/learn.md). Model editing
answers this with a scope (GRACE's deferral radius, MELO's routed blocks): an edit applies to inputs
close to the ones it was made from. mace's scope is lexical and cheap enough for every request:

- a prompt's key is the set of words of its rendered text (chat template included);
- a word's weight is its inverse document frequency among the distinct prompts served lately
  (`PromptStatistics`, seeded with the rehearsal anchors' questions), so the template's words and
  words every question has weigh nothing, and a topic's words weigh most;
- a request is in a lineage's scope when the weighted Jaccard similarity of its key to one of the
  lineage's taught prompts reaches `train.scope_similarity` (0 puts every prompt in scope).

Where the server cannot tell (no taught prompt known here, as on a follower of another server's
lineage, or a prompt of common words only) the prompt is in scope: the adapter answers, as without a
scope. Every method runs on the engine thread.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable

WORD = re.compile(r"\w+")
MAX_TAUGHT_PROMPTS = 512  # the oldest leave first; the replay window is 256 samples by default
MAX_COUNTED_PROMPTS = 4096


def prompt_words(text: str) -> frozenset[str]:
    return frozenset(word.lower() for word in WORD.findall(text))


class PromptStatistics:
    """How many of the distinct prompts served lately hold each word: what makes a word say something
    about a topic. A prompt asked again counts once, or a question asked often would make its own
    topic's words common; the oldest prompts leave the count, so it follows what users ask now."""

    def __init__(self, seed: Iterable[frozenset[str]] = ()) -> None:
        self._prompts: OrderedDict[frozenset[str], None] = OrderedDict()  # oldest first
        self._frequency: Counter[str] = Counter()
        for words in seed:
            self.observe(words)

    @property
    def num_prompts(self) -> int:
        return len(self._prompts)

    def observe(self, words: frozenset[str]) -> None:
        if words in self._prompts:
            self._prompts.move_to_end(words)
            return
        self._prompts[words] = None
        self._frequency.update(words)
        if len(self._prompts) > MAX_COUNTED_PROMPTS:
            oldest, _ = self._prompts.popitem(last=False)
            self._frequency.subtract(oldest)

    def weight(self, word: str) -> float:
        return math.log((1 + self.num_prompts) / (1 + self._frequency[word]))


class Scope:
    """One lineage's taught prompts, by their words, with an index from each word to the prompts holding it."""

    def __init__(self) -> None:
        self._taught: OrderedDict[frozenset[str], None] = OrderedDict()  # oldest first
        self._holding: dict[str, set[frozenset[str]]] = {}
        self.num_in_scope = 0  # requests served its active version
        self.num_outside = 0  # requests it turned to version 0

    def __len__(self) -> int:
        return len(self._taught)

    def teach(self, words: frozenset[str]) -> None:
        if words in self._taught:
            self._taught.move_to_end(words)
            return
        self._taught[words] = None
        for word in words:
            self._holding.setdefault(word, set()).add(words)
        if len(self._taught) > MAX_TAUGHT_PROMPTS:
            self._forget(next(iter(self._taught)))

    def similarity(self, words: frozenset[str], statistics: PromptStatistics,
                   threshold: float | None = None) -> float | None:
        """The best weighted Jaccard similarity to a taught prompt; None where it says nothing (nothing
        taught here, or no word of `words` weighs anything). With a `threshold` it answers only on
        which side of it the best lies: the first similarity at least that, or one below it.

        The shared weight of every taught prompt comes from the index in one pass; a prompt's union is
        worked out only when its shared weight over the query's alone (a bound on its similarity) could
        beat the best so far, so a common word shared by hundreds of taught prompts costs little."""
        weights = {word: statistics.weight(word) for word in words}
        query_weight = sum(weights.values())
        if not self._taught or query_weight <= 0:
            return None
        shared: dict[frozenset[str], float] = {}
        for word, weight in weights.items():
            if weight > 0:
                for taught in self._holding.get(word, ()):
                    shared[taught] = shared.get(taught, 0.0) + weight
        best = 0.0
        for taught, shared_weight in sorted(shared.items(), key=lambda item: item[1], reverse=True):
            bound = shared_weight / query_weight  # its union weighs at least the query's
            if bound <= best or (threshold is not None and bound < threshold):
                break  # ranked by shared weight: no later prompt can beat the best, or reach the threshold
            union = query_weight
            for word in taught:
                if word not in words:
                    known = weights.get(word)
                    if known is None:
                        known = weights[word] = statistics.weight(word)
                    union += known
            best = max(best, shared_weight / union)
            if threshold is not None and best >= threshold:
                break
        return best

    def covers(self, words: frozenset[str], statistics: PromptStatistics, threshold: float) -> bool:
        if threshold <= 0:
            return True
        similarity = self.similarity(words, statistics, threshold)
        return similarity is None or similarity >= threshold

    def route(self, words: frozenset[str], statistics: PromptStatistics, threshold: float) -> bool:
        """`covers`, counted: whether a request with `words` runs on the lineage's active version."""
        inside = self.covers(words, statistics, threshold)
        if inside:
            self.num_in_scope += 1
        else:
            self.num_outside += 1
        return inside

    def _forget(self, words: frozenset[str]) -> None:
        del self._taught[words]
        for word in words:
            holding = self._holding[word]
            holding.discard(words)
            if not holding:
                del self._holding[word]
