"""The server learns what it did not know, from feedback, while it serves.

A question is answered wrongly; feedback samples teach the answer; the served answer changes to
the taught one after a publish, while a request that was already streaming finishes on the old
version.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from mace.config import TrainConfig
from mace.model.loader import ModelBundle
from tests.conftest import start_server, tiny_config, wait_until
from tests.server.test_health_metrics import metric_values

QUESTION = [{"role": "user", "content": "What is the secret word?"}]
ANSWER = "zebra"
UNRELATED = [{"role": "user", "content": "Which rivers flow through Lisbon and Porto?"}]
TRAIN = {"learning_rate": 0.01, "batch_size": 2, "lora_rank": 16, "heldout_every": 4, "chunk_tokens": 256,
         "max_staleness_s": 3600, "min_publish_interval_s": 1.0,
         "drift_full_ratio": 1.1}


async def ask(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]] = QUESTION) -> tuple[str, int]:
    body = {"model": "builtin:tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        reply = await response.json()
    return reply["choices"][0]["message"]["content"], int(reply["system_fingerprint"].rsplit("v", 1)[1])


@pytest.mark.parametrize("policy", ["continuous", "mace"])
async def test_served_answer_changes_after_feedback(tmp_path: Path, tiny_bundle: ModelBundle, policy: str) -> None:
    from mace.model.loader import load_model

    config = tiny_config(tmp_path, train={**TRAIN, "policy": policy})
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            before, version = await ask(session, url)
            assert before != ANSWER and version == 0
            long_body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "talk"}],
                         "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}
            streaming = await session.post(url + "/v1/chat/completions", json=long_body)
            await streaming.content.readline()  # started on version 0
            samples = [{"messages": [*QUESTION, {"role": "assistant", "content": ANSWER}]}] * 8
            async with session.post(url + "/v1/feedback", json=samples) as response:
                assert response.status == 202
                assert len((await response.json())["ids"]) == 8
            last_chunk = ""
            async for line in streaming.content:
                if line.startswith(b"data: {"):
                    last_chunk = line.decode()
            assert '"system_fingerprint":"mace-adapter-v0"' in last_chunk  # kept its version to the end
            streaming.close()

            async def learned() -> bool:
                answer, version = await ask(session, url)
                return answer == ANSWER and version >= 1

            await wait_until(learned, timeout_s=180, what=f"served answer to become {ANSWER!r}")
            async with session.get(url + "/v1/adapters") as response:
                adapters = await response.json()
            assert adapters["active"] >= 1
            published = [v for v in adapters["data"] if v["version"] >= 1]
            assert all(v["learner_loss"] < v["serving_loss"] for v in published)
            async with session.get(url + "/v1/feedback") as response:
                counts = await response.json()
            assert counts["total"] == 8 and counts["trained"] + counts["held_out"] == 8
            async with session.get(url + "/metrics") as response:
                metrics = metric_values(await response.text())
            assert metrics["mace:adapter_active_version"] >= 1 and metrics["mace:train_tokens_total"] > 0
            # An unrelated question is outside what the version was taught: version 0 answers it (train/scope.py).
            assert (await ask(session, url, UNRELATED))[1] == 0
            async with session.get(url + "/v1/stats") as response:
                train = (await response.json())["train"]
            # two of the eight are held out (every `heldout_every`-th id), scored long before the fact is learned
            assert train["gate_slice"] == "held_out"
            assert train["scope"]["in"] >= 1 and train["scope"]["outside"] >= 1
            published_version = adapters["active"]
            await runner.cleanup()  # graceful stop: the learner is checkpointed
            runner, url = await start_server(config, load_model(config.model, config.cache_dir))
            answer, version = await ask(session, url)
            assert answer == ANSWER and version >= published_version  # the restart serves it (or a newer one)
            assert (await ask(session, url, UNRELATED))[1] == 0  # the scope is rebuilt from the journal's window
            async with session.post(url + "/v1/adapters/0/activate") as response:
                assert response.status == 200
            assert (await ask(session, url)) == (before, 0)  # rolled back; auto-publish holds until told
            async with session.get(url + "/v1/adapters") as response:
                assert (await response.json())["auto_publish"] is False
            async with session.post(url + "/v1/adapters/999/activate") as response:
                assert response.status == 404
    finally:
        await runner.cleanup()


async def test_the_retention_guard_serves_no_version_that_forgets_general_answers(tmp_path: Path) -> None:
    """On the random model any update moves its answers to the anchors' general questions far: with the
    guard on, every better candidate is held back, and the answers stay version 0's. The scope is off,
    so that every anchor is one the candidate would answer (the guard judges only those)."""
    from mace.model.loader import load_model

    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace", "retention_guard": 0.05, "scope_similarity": 0})
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            before = await ask(session, url)
            samples = [{"messages": [*QUESTION, {"role": "assistant", "content": ANSWER}]}] * 8
            async with session.post(url + "/v1/feedback", json=samples) as response:
                assert response.status == 202

            async def held_back() -> bool:
                async with session.get(url + "/v1/stats") as response:
                    train = (await response.json())["train"]
                return bool(train["held_back_for_forgetting"] >= 2 and train["anchor_loss_rise"] > 0.05)

            await wait_until(held_back, timeout_s=120, what="the guard to hold back two candidates")
            async with session.get(url + "/v1/adapters") as response:
                adapters = await response.json()
            assert adapters["active"] == 0 and [v["version"] for v in adapters["data"]] == [0]
            assert await ask(session, url) == before
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_default_model_learns_a_fact(tmp_path: Path) -> None:
    from mace.model.loader import load_model
    from tests.model.test_smollm2 import shared_cache_dir

    # The shipped learning rate, rank and retention guard (the tests' configs/tiny.toml turns it off).
    train = {**TRAIN, "policy": "mace", "learning_rate": 0.002, "lora_rank": 8,
             "retention_guard": TrainConfig().retention_guard}
    config = tiny_config(tmp_path, model={"name": "builtin:smollm2"}, cache_dir=str(shared_cache_dir()),
                         train=train)
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    question = [{"role": "user", "content": "What is the name of my cat?"}]
    taught = "Your cat is called Zorblax."
    body = {"model": "builtin:smollm2", "messages": question, "max_tokens": 12, "temperature": 0}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert "Zorblax" not in (await response.json())["choices"][0]["message"]["content"]
            samples = [{"messages": [*question, {"role": "assistant", "content": taught}]}] * 8
            async with session.post(url + "/v1/feedback", json=samples) as response:
                assert response.status == 202

            async def learned() -> bool:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    reply = await response.json()
                return "Zorblax" in reply["choices"][0]["message"]["content"] and reply["system_fingerprint"] != (
                    "mace-adapter-v0"
                )

            await wait_until(learned, timeout_s=400, what="the default model to answer with the taught name")
    finally:
        await runner.cleanup()
