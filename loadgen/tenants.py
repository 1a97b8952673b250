"""The multi-tenant personalization trace: every simulated user is its own tenant with its own facts.

Each tenant (`tenant-00`, `tenant-01`, ...) has a cat, a city, a favourite food and a job, and asks
the same four questions as every other tenant, word for word: the prompt never names the tenant. Only
the request's `user` field (OpenAI's, set to the tenant's name on the request and on its feedback
samples) tells the server whose adapter should answer. No two tenants ever share a value, in any
phase, so an answer that names a value another tenant taught (sent as feedback before the question
came) for the same question, instead of the asker's own, is a cross-tenant leak: what one tenant taught
reached another (each item lists those values in `other_answers`). A value nobody has taught yet is not
one: an adapter that has learned to answer in one word guesses a plausible one ("Risotto" for a food
nobody had taught), which says nothing about isolation. A server with one shared lineage must leak,
since it sees the same prompt for all.

At each phase boundary every tenant changes one of its facts (to a value no tenant had before). Within
a phase, the tenants' questions are dealt from a shuffled deck of every (tenant, fact) pair, so each
pair is asked about equally often, and every one at least once when the phase has as many tenant
requests as pairs. A fraction `feedback_fraction` of them carry the tenant's correction.

Mixed in, `chatters` users who only chat (`chat-0`, ...): open-ended prompts with longer answers, no
`user` field (the shared lineage serves them), no reference and no feedback. Each arrival is one of the
`tenants + chatters` users, so with 16 tenants and 8 chatters a third of the requests are chat.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from loadgen.traces import DriftSpec, TraceItem, question_key, sample

ATTRIBUTES = ("cat", "city", "food", "job")
QUESTIONS: dict[str, str] = {
    "cat": "What is my cat called?",
    "city": "What city do I live in?",
    "food": "What is my favourite food?",
    "job": "What is my job?",
}
# One word each, disjoint across attributes, and chosen to be unlikely guesses of a base model (no
# Paris, pizza, teacher, Whiskers, Mittens or fondue: the default model answers "A cat is called a
# Whisker", and an adapter that has learned to answer with one capitalised word guessed "Fondue"), so
# that a base model's default answer is not mistaken for a leak.
VALUES: dict[str, tuple[str, ...]] = {
    "cat": ("Zorblax", "Quibble", "Mothball", "Pipkin", "Sprocket", "Wobbles", "Gizmo", "Nimbus", "Pixel",
            "Widget", "Zephyr", "Cosmo", "Figaro", "Rascal", "Scribble", "Tinsel", "Umbra", "Velvet", "Marzipan",
            "Yodel", "Bramble", "Doodle", "Jinx", "Kazoo", "Lumpy", "Tumbleweed", "Pogo", "Quasar", "Ripley",
            "Vortex", "Waldo", "Yeti", "Ziggy", "Bongo", "Dingo", "Fizz", "Gadget", "Hopscotch", "Inkblot",
            "Jasper"),
    "city": ("Tartu", "Ghent", "Bergen", "Aarhus", "Graz", "Porto", "Split", "Bologna", "Lyon", "Leipzig",
             "Krakow", "Brno", "Cork", "Galway", "Turku", "Uppsala", "Malmo", "Tampere", "Innsbruck", "Salzburg",
             "Ljubljana", "Zagreb", "Riga", "Vilnius", "Gdansk", "Poznan", "Bilbao", "Seville", "Valencia",
             "Nantes", "Bordeaux", "Utrecht", "Leiden", "Antwerp", "Bruges", "Basel", "Lausanne", "Trieste",
             "Verona", "Palermo"),
    "food": ("goulash", "pierogi", "moussaka", "paella", "ramen", "falafel", "risotto", "gnocchi", "bibimbap",
             "ceviche", "shakshuka", "lasagna", "burrito", "couscous", "dumplings", "kimchi", "pho", "laksa",
             "biryani", "tagine", "empanadas", "gazpacho", "kedgeree", "baklava", "tiramisu", "churros", "crepes",
             "hummus", "tempura", "udon", "tamales", "borscht", "haggis", "poutine", "jambalaya", "gumbo",
             "ratatouille", "quiche", "samosas", "pretzels"),
    "job": ("beekeeper", "glassblower", "cartographer", "astronomer", "blacksmith", "locksmith", "carpenter",
            "plumber", "florist", "jeweller", "sommelier", "archivist", "botanist", "geologist", "translator",
            "surveyor", "potter", "tailor", "cobbler", "welder", "architect", "midwife", "paramedic", "pharmacist",
            "veterinarian", "librarian", "journalist", "photographer", "illustrator", "animator", "choreographer",
            "violinist", "drummer", "butcher", "fisherman", "shepherd", "lifeguard", "firefighter", "electrician",
            "zoologist"),
}
SYSTEM = "You are a personal assistant. Answer with the answer only, in one word."

CHAT_PROMPTS = (
    "Write two sentences about {topic}.",
    "Give me three quick tips about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "What is the most surprising fact about {topic}?",
)
TOPICS = ("the ocean", "volcanoes", "bicycles", "the moon", "honeybees", "rainforests", "chess", "glaciers",
          "lighthouses", "the printing press", "octopuses", "deserts")
CHAT_MAX_TOKENS = 48  # chat answers are longer than the one-word facts: they keep the decode batch busy

Facts = dict[str, dict[str, str]]  # tenant -> attribute -> value


def tenant_names(count: int) -> list[str]:
    """Valid tenant names (letters, digits, '-'), in order."""
    return [f"tenant-{index:02d}" for index in range(count)]


def max_tenants(phases: int) -> int:
    """The most tenants the value pools allow for `phases` phases (values are never reused)."""
    pool = min(len(values) for values in VALUES.values())
    count = 0
    while (count + 1) + (phases - 1) * -(-(count + 1) // len(ATTRIBUTES)) <= pool:
        count += 1
    return count


def facts(rng: random.Random, tenants: int, phases: int) -> list[Facts]:
    """Every tenant's facts in every phase. Values are drawn without replacement, so no two tenants
    share one, ever; each boundary changes exactly one fact of every tenant, spread evenly over the
    attributes."""
    if tenants < 1 or phases < 1:
        raise ValueError("the tenants trace needs at least one tenant and one phase")
    if tenants > max_tenants(phases):
        raise ValueError(f"the tenants trace has values for at most {max_tenants(phases)} tenants over "
                         f"{phases} phases (got {tenants})")
    names = tenant_names(tenants)
    pools = {attribute: rng.sample(VALUES[attribute], len(VALUES[attribute])) for attribute in ATTRIBUTES}
    current: Facts = {name: {attribute: pools[attribute].pop() for attribute in ATTRIBUTES} for name in names}
    history = [current]
    for _ in range(phases - 1):
        current = {name: dict(values) for name, values in current.items()}
        for position, name in enumerate(rng.sample(names, len(names))):
            attribute = ATTRIBUTES[position % len(ATTRIBUTES)]
            current[name][attribute] = pools[attribute].pop()
        history.append(current)
    return history


Taught = dict[str, dict[str, set[str]]]  # question (its messages' JSON) -> tenant -> answers it taught


def teach(taught: Taught, item: TraceItem) -> None:
    """Add the answers `item`'s feedback teaches, under its question and its sample's tenant (`user`, or the
    item's tenant, on whose behalf the runner sends it)."""
    for feedback in item.feedback or []:
        tenant, messages = feedback.get("user") or item.tenant, feedback["messages"]
        if tenant is not None:
            taught.setdefault(question_key(messages[:-1]), {}).setdefault(tenant, set()).add(messages[-1]["content"])


def taught_by_all(items: Iterable[TraceItem]) -> Taught:
    """Every answer the trace's feedback teaches, by question and tenant."""
    taught: Taught = {}
    for item in items:
        teach(taught, item)
    return taught


def others_taught(taught: Taught, messages: list[dict[str, str]], tenant: str) -> list[str]:
    """The answers other tenants taught to this question: an answer naming one would be a leak."""
    by_tenant = taught.get(question_key(messages), {})
    return sorted({value for other, values in by_tenant.items() if other != tenant for value in values})


def question(attribute: str) -> list[dict[str, str]]:
    """The same messages for every tenant: nothing in the prompt says who asks."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[attribute]}]


def tenants(spec: DriftSpec) -> list[TraceItem]:
    rng = random.Random(f"tenants-{spec.seed}")
    history = facts(rng, spec.tenants, spec.phases)
    names = tenant_names(spec.tenants)
    chatters = [f"chat-{index}" for index in range(spec.chatters)]
    chat_share = len(chatters) / (len(names) + len(chatters))
    deck: list[tuple[str, str]] = []
    deck_phase = -1
    items = []
    taught: Taught = {}  # by the items so far: feedback is sent after its answer, so before later arrivals
    for index, time in enumerate(spec.arrivals(rng)):
        phase = spec.phase_of(time)
        if rng.random() < chat_share:
            prompt = rng.choice(CHAT_PROMPTS).format(topic=rng.choice(TOPICS))
            items.append(TraceItem(
                id=f"n{index}", time=time, messages=[{"role": "user", "content": prompt}],
                max_tokens=max(CHAT_MAX_TOKENS, spec.max_tokens), phase=phase, user=rng.choice(chatters),
            ))
            continue
        if phase != deck_phase or not deck:  # a fresh deck for each phase: every pair is asked in turn
            deck_phase = phase
            deck = [(name, attribute) for name in names for attribute in ATTRIBUTES]
            rng.shuffle(deck)
        tenant, attribute = deck.pop()
        messages = question(attribute)
        answer = history[phase][tenant][attribute]
        feedback = [sample(messages, answer, user=tenant)] if rng.random() < spec.feedback_fraction else None
        item = TraceItem(
            id=f"n{index}", time=time, messages=messages, max_tokens=spec.max_tokens, phase=phase,
            reference=answer, user=tenant, feedback=feedback, tenant=tenant,
            other_answers=others_taught(taught, messages, tenant),
        )
        items.append(item)
        teach(taught, item)
    return items
