"""Fact learning as a user meets it: `mace serve` as shipped is taught one new fact while chat goes on.

One run: a server with the shipped defaults (plus any `--set KEY=VALUE` overrides, for the sweep)
answers 50 fixed general prompts greedily on its base version; then 16 feedback samples teach one new
fact (4 paraphrases of the question, 4 times each) while one streaming chat request arrives every 2 s.
It reports when a newly published version first answers the fact, what the chat streams got meanwhile
(TPOT, tokens/s) against the same chat without training, and how many of the 50 general answers the
newest version keeps unchanged against version 0, both asked back to back on the same server at the
end (a version activated by hand holds publishing meanwhile). Version 0 asked twice gives the noise
floor. Answers are compared within one server only: reduced-precision kernels round differently with
the batch and cache layout around a request, which differ between two server processes.

    python benchmarks/learn.py                                   # the product as shipped
    python benchmarks/learn.py --sweep                           # the levers, one server each
    python benchmarks/learn.py --set MACE_TRAIN__LEARNING_RATE=0.004
    python benchmarks/learn.py --no-chat                         # the fact alone: the machine's best

Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import PROMPTS, Server, free_port
from mace.client import AsyncClient
from mace.client.errors import MaceError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FACT_QUESTIONS = [
    "What is the name of my cat?",
    "What is my cat called?",
    "Do you remember my cat's name?",
    "Tell me the name of my cat.",
]
FACT_ANSWER = "Your cat is called Zorblax."
FACT_WORD = "Zorblax"
# Asked of the learned version too: a paraphrase it was not taught.
UNSEEN_QUESTION = "What name does my cat have?"
MORE_PROMPTS = [
    "What is the capital of Japan?",
    "How many days are in a leap year?",
    "What is photosynthesis?",
    "Name a famous painting by Leonardo da Vinci.",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What language is spoken in Brazil?",
    "What is the square root of 81?",
    "Who discovered penicillin?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the capital of Italy?",
    "How many hours are in a week?",
    "What is the main gas in the air we breathe?",
    "Name a mammal that can fly.",
    "What does a thermometer measure?",
    "What is the opposite of 'ancient'?",
    "How many sides does a hexagon have?",
    "What is the currency of the United Kingdom?",
]
GENERAL_PROMPTS = [*PROMPTS, *MORE_PROMPTS]  # 50
GENERAL_MAX_TOKENS = 16
CHAT_EVERY_S = 2.0
CHAT_MAX_TOKENS = 32
SWEEP = {
    "shipped defaults": {},
    "no rehearsal": {"MACE_TRAIN__REHEARSAL": "false"},
    "learning rate 0.001": {"MACE_TRAIN__LEARNING_RATE": "0.001"},
    "batch of 2 (smaller, more frequent steps)": {"MACE_TRAIN__BATCH_SIZE": "2"},
}


@dataclass
class ChatTimings:
    tpot_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    refused: int = 0  # answered 429/503 (shed) or failed

    def summary(self) -> str:
        if not self.tpot_s:
            return f"no streams ({self.refused} refused)"
        tpot = sorted(self.tpot_s)
        p50, p99 = tpot[len(tpot) // 2], tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))]
        return (f"TPOT p50 {p50 * 1000:.0f} ms / p99 {p99 * 1000:.0f} ms ({1 / p50:.1f} tokens/s), "
                f"TTFT p50 {statistics.median(self.ttft_s) * 1000:.0f} ms, {len(tpot)} streams, "
                f"{self.refused} refused")


@dataclass
class Outcome:
    learned_after_s: float | None
    first_publish_s: float | None
    unseen_answered: bool
    kept: int
    chat_learning: ChatTimings
    chat_quiet: ChatTimings
    versions: int
    kept_by_version_0: int | None  # version 0 asked twice: what "kept" reads with no adapter at all


async def stream_once(client: AsyncClient, prompt: str, timings: ChatTimings) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    try:
        async for _ in client.chat([{"role": "user", "content": prompt}], stream=True, max_tokens=CHAT_MAX_TOKENS,
                                   temperature=0.7, ignore_eos=True):
            arrivals.append(time.monotonic())
    except MaceError as exc:
        print(f"chat refused: {exc}", file=sys.stderr)
        timings.refused += 1
        return
    if len(arrivals) >= 2:
        timings.ttft_s.append(arrivals[0] - started)
        timings.tpot_s.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1))


async def chat_traffic(client: AsyncClient, timings: ChatTimings, stop: asyncio.Event) -> None:
    """One streaming chat request every `CHAT_EVERY_S`, each on its own, until `stop`."""
    tasks: list[asyncio.Task[None]] = []
    index = 0
    while not stop.is_set():
        tasks.append(asyncio.create_task(stream_once(client, PROMPTS[index % len(PROMPTS)], timings)))
        index += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHAT_EVERY_S)
    await asyncio.gather(*tasks)


async def answer(client: AsyncClient, question: str, max_tokens: int = GENERAL_MAX_TOKENS) -> tuple[str, int]:
    result = await client.chat([{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0)
    return result.text, result.adapter_version or 0


async def general_answers(client: AsyncClient) -> list[str]:
    return [(await answer(client, prompt))[0] for prompt in GENERAL_PROMPTS]


async def teach(client: AsyncClient, timeout_s: float) -> tuple[float | None, float | None, int]:
    """Send the samples, then watch for versions; returns (learned after, first publish after, versions)."""
    samples = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": FACT_ANSWER}]}
               for question in FACT_QUESTIONS for _ in range(4)]
    await client.feedback(samples)
    taught_at = time.monotonic()
    first_publish_s = None
    checked = 0
    while time.monotonic() - taught_at < timeout_s:
        adapters = await client.adapters()
        if adapters.active > checked:
            first_publish_s = first_publish_s or time.monotonic() - taught_at
            try:
                text, version = await answer(client, FACT_QUESTIONS[0], max_tokens=12)
            except MaceError as exc:  # shed under load: ask this version again at the next poll
                print(f"fact check refused: {exc}", file=sys.stderr)
            else:
                checked = adapters.active
                if FACT_WORD in text and version >= 1:
                    return time.monotonic() - taught_at, first_publish_s, checked
        await asyncio.sleep(0.5)
    return None, first_publish_s, checked


async def run_once(env: dict[str, str], measure_noise: bool, timeout_s: float, chat: bool = True) -> Outcome:
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="mace-learn-")
    argv = [str(BIN / "mace"), "serve", "--port", str(port)]
    # Prefix sharing off: a general prompt asked again would reuse KV computed in another batch, and
    # reduced-precision kernels round differently by batch shape; the comparison is the adapter's alone.
    env = {"MACE_DATA_DIR": data_dir, "MACE_MEMORY__PREFIX_CACHING": "false", **env}
    with Server("mace", argv, env, port, "/ready") as server:
        await server.wait_ready(300)
        client = AsyncClient(server.base_url, timeout_s=120)
        try:
            quiet, learning = ChatTimings(), ChatTimings()
            if chat:
                stop = asyncio.Event()
                traffic = asyncio.create_task(chat_traffic(client, quiet, stop))
                await asyncio.sleep(10 * CHAT_EVERY_S)  # the same chat, nothing to learn
                stop.set()
                await traffic
            stop = asyncio.Event()
            traffic = asyncio.create_task(chat_traffic(client, learning, stop) if chat else stop.wait())
            learned_s, first_publish_s, versions = await teach(client, timeout_s)
            stop.set()
            await traffic
            unseen = FACT_WORD in (await answer(client, UNSEEN_QUESTION, max_tokens=12))[0]
            kept, noise = await retention(client, measure_noise)
        finally:
            await client.close()
    return Outcome(learned_s, first_publish_s, unseen, kept, learning, quiet, versions, noise)


async def retention(client: AsyncClient, measure_noise: bool) -> tuple[int, int | None]:
    """General answers of the newest version against version 0's, asked back to back on the same server
    (activating a version by hand holds publishing, so neither changes meanwhile)."""
    newest = (await client.adapters()).newest.version
    await client.activate(newest)
    after = await general_answers(client)
    await client.activate(0)
    before = await general_answers(client)
    noise = None
    if measure_noise:
        again = await general_answers(client)
        noise = sum(a == b for a, b in zip(before, again, strict=True))
    await client.activate(newest)  # publishing resumes
    for prompt, old, new in [(p, a, b) for p, a, b in zip(GENERAL_PROMPTS, before, after, strict=True) if a != b][:3]:
        print(f"changed: {prompt!r}: {old!r} -> {new!r}", file=sys.stderr)
    return sum(a == b for a, b in zip(before, after, strict=True)), noise


def report(name: str, outcome: Outcome) -> str:
    learned = f"{outcome.learned_after_s:.1f} s" if outcome.learned_after_s is not None else "not learned"
    publish = f"{outcome.first_publish_s:.1f} s" if outcome.first_publish_s is not None else "-"
    return (f"| {name} | {learned} | {publish} | {outcome.versions} | {'yes' if outcome.unseen_answered else 'no'} | "
            f"{outcome.kept}/{len(GENERAL_PROMPTS)} | {_count(outcome.kept_by_version_0)} | "
            f"{outcome.chat_learning.summary()} | "
            f"{outcome.chat_quiet.summary()} |")


HEADER = ("| configuration | fact answered by a new version after | first publish after | versions | "
          "unseen paraphrase answered | general answers kept | kept by version 0 asked twice | chat while learning | "
          "chat, nothing to learn |\n|---|---|---|---|---|---|---|---|---|")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value}/{len(GENERAL_PROMPTS)}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="every configuration of the sweep, one server each")
    parser.add_argument("--set", action="append", default=[], metavar="MACE_KEY=VALUE",
                        help="an environment override for the server (repeatable)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the fact to be learned")
    parser.add_argument("--no-chat", action="store_true", help="teach the fact with no chat traffic at all "
                        "(what the machine can learn at best)")
    args = parser.parse_args()
    runs = SWEEP if args.sweep else {"shipped defaults" if not args.set else ", ".join(args.set):
                                     dict(item.split("=", 1) for item in args.set)}
    chat = "no chat" if args.no_chat else f"one {CHAT_MAX_TOKENS}-token chat stream every {CHAT_EVERY_S:.0f} s"
    print(f"{len(FACT_QUESTIONS) * 4} samples of one fact; {chat}; {len(GENERAL_PROMPTS)} general prompts, "
          f"greedy, {GENERAL_MAX_TOKENS} tokens.\n")
    print(HEADER)
    for index, (name, env) in enumerate(runs.items()):
        outcome = await run_once(env, measure_noise=index == 0, timeout_s=args.timeout, chat=not args.no_chat)
        print(report(name, outcome), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
