"""One correction, then rest: a user who sends a single correction is served it, and the server stops
training once its learner fits everything it was taught, until new feedback arrives.

Too few samples for a held-out slice (every `heldout_every`-th is held out) used to leave the publish
gate nothing to judge on, and an idle server trained on one sample forever without serving it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from mace.model.loader import load_model
from tests.conftest import start_server, tiny_config, wait_until
from tests.server.test_health_metrics import metric_values
from tests.train.test_learning import ANSWER, QUESTION, TRAIN, ask


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as response:
        return metric_values(await response.text())


async def test_one_correction_is_served_and_then_training_rests_until_new_feedback(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, train={**TRAIN, "policy": "mace"})
    assert config.train.heldout_every > 2  # the two samples below leave the held-out slice empty
    runner, url = await start_server(config, load_model(config.model, config.cache_dir))
    try:
        async with aiohttp.ClientSession() as session:
            correction = {"messages": [*QUESTION, {"role": "assistant", "content": ANSWER}]}
            async with session.post(url + "/v1/feedback", json=[correction, correction]) as response:
                assert response.status == 202

            async def learned() -> bool:
                answer, version = await ask(session, url)
                return answer == ANSWER and version >= 1

            await wait_until(learned, timeout_s=180, what=f"served answer to become {ANSWER!r}")
            published = [v for v in (await _get(session, url + "/v1/adapters"))["data"] if v["version"] >= 1]
            assert published and "training samples" in published[0]["reason"]
            assert (await _get(session, url + "/v1/stats"))["train"]["gate_slice"] == "training_samples"

            async def resting() -> bool:
                return bool((await _get(session, url + "/v1/stats"))["train"]["resting"])

            await wait_until(resting, timeout_s=180, what="the learner to fit both samples and rest")
            assert (await _metrics(session, url))["mace:train_resting"] == 1
            before = await _metrics(session, url)
            # A chat request runs engine steps with slack to spare: a trainer that still trained would use it.
            body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "talk"}],
                    "max_tokens": 48, "ignore_eos": True, "temperature": 0}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
            after = await _metrics(session, url)
            assert after["mace:engine_steps_total"] >= before["mace:engine_steps_total"] + 48
            assert after["mace:train_tokens_total"] == before["mace:train_tokens_total"]
            assert after["mace:train_optimizer_steps_total"] == before["mace:train_optimizer_steps_total"]

            new_fact = {"messages": [{"role": "user", "content": "What is the other word?"},
                                     {"role": "assistant", "content": "giraffe"}]}
            async with session.post(url + "/v1/feedback", json=[new_fact]) as response:
                assert response.status == 202

            async def training_again() -> bool:
                return (await _metrics(session, url))["mace:train_tokens_total"] > after["mace:train_tokens_total"]

            await wait_until(training_again, timeout_s=60, what="training to resume on the new sample")
    finally:
        await runner.cleanup()
