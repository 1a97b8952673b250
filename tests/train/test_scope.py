"""A lineage's scope: its versions answer prompts near what it was taught, version 0 the rest."""

from __future__ import annotations

import pytest

from mace.train import scope as scope_module
from mace.train.scope import PromptStatistics, Scope, prompt_words

THRESHOLD = 0.35
GENERAL = ["What is the capital of Japan?", "How many days are in a leap year?", "Who discovered penicillin?",
           "What is photosynthesis?", "Name a mammal that can fly.", "How many sides does a hexagon have?",
           "What is the chemical symbol for gold?", "What language is spoken in Brazil?", "Who was Albert Einstein?",
           "What is the largest planet in our solar system?", "Give me a tip for staying healthy.",
           "What is the main gas in the air we breathe?"]
TAUGHT = ["What is the name of my cat?", "What is my cat called?", "Do you remember my cat's name?"]


def rendered(question: str) -> frozenset[str]:
    """As a served chat prompt's words are read: the template's words and the question's."""
    return prompt_words(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}"
                        "<|im_end|>\n<|im_start|>assistant\n")


def served(questions: list[str]) -> PromptStatistics:
    return PromptStatistics(rendered(question) for question in questions)


def taught(questions: list[str]) -> Scope:
    scope = Scope()
    for question in questions:
        scope.teach(rendered(question))
    return scope


def test_a_paraphrase_is_in_scope_and_an_unrelated_question_is_not() -> None:
    statistics, scope = served(GENERAL), taught(TAUGHT)
    assert scope.covers(rendered("What name does my cat have?"), statistics, THRESHOLD)
    assert scope.covers(rendered(TAUGHT[0]), statistics, THRESHOLD)
    unrelated = [*GENERAL, "What is the capital of Italy?"]
    inside = [q for q in unrelated if scope.covers(rendered(q), statistics, THRESHOLD)]
    assert inside == []


def test_where_the_scope_cannot_tell_the_adapter_answers() -> None:
    statistics = served(GENERAL)
    assert Scope().covers(rendered("What is the capital of Japan?"), statistics, THRESHOLD)  # nothing taught here
    assert taught(TAUGHT).similarity(rendered(""), statistics) is None  # the template's words weigh nothing
    assert taught(TAUGHT).covers(rendered("Who discovered penicillin?"), statistics, threshold=0)  # scope off


def test_a_question_asked_again_does_not_make_its_own_words_common() -> None:
    statistics = served(GENERAL)
    before = statistics.weight("cat")
    for _ in range(20):
        statistics.observe(rendered(TAUGHT[0]))
    assert statistics.num_prompts == len(GENERAL) + 1
    assert statistics.weight("cat") == pytest.approx(PromptStatistics([*map(rendered, GENERAL), rendered(TAUGHT[0])])
                                                     .weight("cat"))
    assert statistics.weight("cat") < before
    assert taught(TAUGHT).covers(rendered("What name does my cat have?"), statistics, THRESHOLD)


def test_route_counts_what_it_decides() -> None:
    statistics, scope = served(GENERAL), taught(TAUGHT)
    assert scope.route(rendered(TAUGHT[1]), statistics, THRESHOLD)
    assert not scope.route(rendered("Who discovered penicillin?"), statistics, THRESHOLD)
    assert (scope.num_in_scope, scope.num_outside) == (1, 1)


def test_the_oldest_taught_and_counted_prompts_leave_past_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scope_module, "MAX_TAUGHT_PROMPTS", 2)
    monkeypatch.setattr(scope_module, "MAX_COUNTED_PROMPTS", 3)
    scope = taught(TAUGHT)
    assert len(scope) == 2
    statistics = served(GENERAL)
    assert statistics.num_prompts == 3
    assert statistics.weight("japan") == statistics.weight("no-such-word")  # its prompt left the count
    # The first taught prompt left: only the two newer ones (both about "my cat") remain.
    assert scope.similarity(rendered(TAUGHT[0]), statistics) == pytest.approx(
        taught(TAUGHT[1:]).similarity(rendered(TAUGHT[0]), statistics))


@pytest.mark.parametrize("threshold", [0.1, 0.35, 0.6, 1.0])
def test_the_early_stops_decide_as_the_full_search_does(threshold: float) -> None:
    statistics, scope = served(GENERAL), taught([*TAUGHT, *GENERAL[:3]])
    for question in [*GENERAL, *TAUGHT, "What name does my cat have?", "How old is my cat?", "Who is Japan's cat?"]:
        best = scope.similarity(rendered(question), statistics)
        assert best is not None
        assert scope.covers(rendered(question), statistics, threshold) == (best >= threshold), question
