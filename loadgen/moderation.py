"""The moderation drift trace: messages labelled allow/block by a policy that changes between phases.

Messages come from per-category templates. Spam is always blocked and small talk always allowed;
each of the other categories is blocked or allowed by the phase's policy, and every phase boundary
flips at least one of them, so what was right before a boundary is wrong after it. The feedback is
the moderator's correction: the message with its label under the current policy.
"""

from __future__ import annotations

import random

from loadgen.traces import DriftSpec, TraceItem, sample

TEMPLATES: dict[str, tuple[str, ...]] = {
    "smalltalk": ("Hi {name}, how was your weekend?", "Thanks for the help yesterday, {name}!",
                  "Is anyone up for lunch at {place}?"),
    "spam": ("BUY cheap {product} now!!! Click {site} before it's gone",
             "You won a free {product}, claim it at {site}"),
    "crypto": ("Invest in {coin} today, guaranteed 100x returns", "Join my {coin} pool and double your money"),
    "politics": ("Everyone should vote for the {party} party", "The {party} party is ruining this country"),
    "medical": ("Just take {drug} for your {illness}, no need for a doctor", "I cured my {illness} with {drug}"),
    "gambling": ("Bet on {team} tonight at {site}, odds are great", "My {team} betting system never loses"),
    "recruiting": ("We're hiring at {company}, DM me your CV", "Work from home for {company}, $500 a day"),
}
FILL: dict[str, tuple[str, ...]] = {
    "name": ("Sam", "Alex", "Jo", "Kim", "Lee"),
    "place": ("the canteen", "Luigi's", "the park"),
    "product": ("watches", "sneakers", "phones", "pills"),
    "site": ("deals.example", "win.example", "bet.example"),
    "coin": ("MoonCoin", "DogeGold", "ZapToken"),
    "party": ("Green", "Blue", "Orange"),
    "drug": ("garlic pills", "vitamin megadoses", "herbal tea"),
    "illness": ("flu", "migraine", "back pain"),
    "team": ("the Hawks", "the Lions", "United"),
    "company": ("Acme", "Globex", "Initech"),
}
ALWAYS = {"smalltalk": "allow", "spam": "block"}
SYSTEM = "You are a content moderator. Reply with exactly one word: allow or block."


def policies(rng: random.Random, phases: int) -> list[dict[str, str]]:
    """The label of every category in every phase."""
    changing = sorted(set(TEMPLATES) - set(ALWAYS))
    current = {**ALWAYS, **{c: rng.choice(("allow", "block")) for c in changing}}
    history = [current]
    for _ in range(phases - 1):
        current = dict(current)
        for category in rng.sample(changing, rng.randint(1, 3)):
            current[category] = "allow" if current[category] == "block" else "block"
        history.append(current)
    return history


def moderation(spec: DriftSpec) -> list[TraceItem]:
    rng = random.Random(f"moderation-{spec.seed}")
    history = policies(rng, spec.phases)
    items = []
    for index, time in enumerate(spec.arrivals(rng)):
        phase = spec.phase_of(time)
        category = rng.choice(sorted(TEMPLATES))
        template = rng.choice(TEMPLATES[category])
        text = template.format(**{key: rng.choice(values) for key, values in FILL.items()})
        question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Message: {text}"}]
        label = history[phase][category]
        feedback = [sample(question, label)] if rng.random() < spec.feedback_fraction else None
        items.append(TraceItem(
            id=f"m{index}", time=time, messages=question, max_tokens=spec.max_tokens, phase=phase,
            reference=label, user=category, feedback=feedback,
        ))
    return items
