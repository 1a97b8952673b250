"""The personalization drift trace: users' facts and preferences, which change at phase boundaries.

Each user has a value for every attribute (favourite colour, city, pet's name, ...). At each phase
boundary every user changes at least one attribute. A request is a user asking the assistant about
one of their own facts; the reference answer is the fact's value in the request's phase, and the
feedback (on a seeded fraction of requests) is the user's correction: the question with that answer.
The facts are never in the prompt, so only a server that learns from the feedback can answer well.

By default no request names a tenant: one shared adapter learns every user's facts, and must bind each
answer to the user the system prompt names. With `DriftSpec.user_tenants` each user is its own tenant
(its requests and corrections carry OpenAI's `user`), as an assistant that knows its users would send
them, and each user's facts are learned by that user's own lineage.
"""

from __future__ import annotations

import random

from loadgen.traces import DriftSpec, TraceItem, sample

NAMES = (
    "Ada", "Boris", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kira", "Luca", "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
)
VALUES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "teal"),
    "city": ("Paris", "Lisbon", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Dublin", "Quito"),
    "pet": ("Biscuit", "Luna", "Max", "Pepper", "Milo", "Coco", "Ziggy", "Nala", "Oscar", "Mochi"),
    "food": ("pizza", "sushi", "tacos", "curry", "ramen", "paella", "falafel", "pho", "risotto", "dumplings"),
    "sport": ("tennis", "football", "chess", "cycling", "rowing", "climbing", "boxing", "golf", "judo", "surfing"),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What is my favourite colour?", "Which colour do I like best?"),
    "city": ("Which city do I live in?", "Where do I live? Name the city."),
    "pet": ("What is my pet's name?", "What did I name my pet?"),
    "food": ("What is my favourite food?", "Which dish do I like most?"),
    "sport": ("Which sport do I play?", "What is my sport?"),
}
SYSTEM = "You are the personal assistant of {name}. Answer with the answer only, in one or two words."

Profiles = dict[str, dict[str, str]]


def profiles(rng: random.Random, users: int, phases: int) -> list[Profiles]:
    """The facts of every user in every phase; each boundary changes 1 to 2 attributes per user."""
    current: Profiles = {name: {a: rng.choice(v) for a, v in VALUES.items()} for name in NAMES[:users]}
    history = [current]
    for _ in range(phases - 1):
        current = {name: dict(facts) for name, facts in current.items()}
        for facts in current.values():
            for attribute in rng.sample(sorted(VALUES), rng.randint(1, 2)):
                facts[attribute] = rng.choice([v for v in VALUES[attribute] if v != facts[attribute]])
        history.append(current)
    return history


def personalization(spec: DriftSpec, users: int = 8) -> list[TraceItem]:
    rng = random.Random(f"personalization-{spec.seed}")
    history = profiles(rng, min(users, len(NAMES)), spec.phases)
    items = []
    for index, time in enumerate(spec.arrivals(rng)):
        phase = spec.phase_of(time)
        name = rng.choice(sorted(history[phase]))
        attribute = rng.choice(sorted(VALUES))
        question = [
            {"role": "system", "content": SYSTEM.format(name=name)},
            {"role": "user", "content": rng.choice(QUESTIONS[attribute])},
        ]
        answer = history[phase][name][attribute]
        feedback = [sample(question, answer)] if rng.random() < spec.feedback_fraction else None
        items.append(TraceItem(
            id=f"p{index}", time=time, messages=question, max_tokens=spec.max_tokens, phase=phase,
            reference=answer, user=name, feedback=feedback, tenant=name if spec.user_tenants else None,
        ))
    return items
