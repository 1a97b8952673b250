"""Tenant isolation on the real default model, which the tiny model's test (`test_tenants.py`) stands in
for: what one tenant teaches, through paraphrases, changes that tenant's greedy answer on SmolLM2 and
no one else's, and that tenant's rollback changes no one else's either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mace.model.loader import load_model
from tests.conftest import start_server, tiny_config, wait_until
from tests.model.test_smollm2 import shared_cache_dir
from tests.train.test_learning import TRAIN

MODEL = "builtin:smollm2"
QUESTION = "What is my cat called?"
PARAPHRASES = [QUESTION, "What's the name of my cat?", "What did I name my cat?", "Do you know my cat's name?"]
TAUGHT = "Your cat is called Zorblax."
VALUE = "Zorblax"

# The exact greedy reply a tenant gets: text, how many tokens, why it stopped, and the version that served it.
Answer = tuple[str, int, str, int]


async def ask(session: aiohttp.ClientSession, url: str, user: str) -> Answer:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                            "max_tokens": 12, "temperature": 0, "user": user}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        reply = await response.json()
    choice = reply["choices"][0]
    version = int(reply["system_fingerprint"].rsplit("v", 1)[1])
    return choice["message"]["content"], reply["usage"]["completion_tokens"], choice["finish_reason"], version


@pytest.mark.slow
async def test_default_model_serves_a_tenants_fact_to_it_alone_and_its_rollback_touches_no_one_else(
    tmp_path: Path,
) -> None:
    # The rate and rank the default model learns a fact quickly with (`test_default_model_learns_a_fact`).
    train = {**TRAIN, "policy": "mace", "learning_rate": 0.002, "lora_rank": 8}
    config = tiny_config(tmp_path, model={"name": MODEL}, train=train)
    # The user's cache, so the one-time conversion from the wheel's GGUF is shared with other runs.
    runner, url = await start_server(config, load_model(config.model, shared_cache_dir()))
    try:
        async with aiohttp.ClientSession() as session:
            before = {user: await ask(session, url, user) for user in ("alice", "bob")}
            for text, _, _, version in before.values():
                assert version == 0
                assert VALUE not in text  # else "bob never sees it" would prove nothing
            # Each paraphrase in a run of four: every 4th sample id is held out, so each paraphrase is
            # both trained and judged, rather than one paraphrase being held out every time.
            samples = [{"user": "alice", "messages": [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": TAUGHT}]}
                       for question in PARAPHRASES for _ in range(4)]
            async with session.post(url + "/v1/feedback", json=samples) as response:
                assert response.status == 202, await response.text()

            judged = 0

            async def alice_learned() -> bool:
                # A greedy answer only once per newly published version: generating on every poll would
                # take the CPU the training needs.
                nonlocal judged
                async with session.get(url + "/v1/adapters", params={"user": "alice"}) as response:
                    active = (await response.json())["active"]
                if active <= judged:
                    return False
                text, _, _, version = await ask(session, url, "alice")
                judged = version
                return VALUE in text and version >= 1

            await wait_until(alice_learned, timeout_s=300, what=f"alice's greedy answer to contain {VALUE!r}")
            bob = await ask(session, url, "bob")
            assert VALUE not in bob[0]
            assert bob == before["bob"]  # the base model's greedy answer, on version 0
            async with session.post(url + "/v1/adapters/0/activate", params={"user": "alice"}) as response:
                assert response.status == 200, await response.text()
            assert await ask(session, url, "alice") == before["alice"]  # back on the base, token for token
            assert await ask(session, url, "bob") == before["bob"]
    finally:
        await runner.cleanup()
