"""SLO classes through the API: class choice, 429 for requests predicted to miss, metrics per class."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from mace.model.loader import ModelBundle
from tests.conftest import start_server, tiny_config
from tests.server.test_health_metrics import metric_values


def body(**extra: object) -> dict[str, object]:
    return {"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, **extra}


async def test_classes_shedding_and_metrics(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    # Queue bound 0 and an interactive TTFT no step can meet: every interactive request is predicted late.
    config = tiny_config(tmp_path, engine={"shed_queue_depth": 0}, slo={"ttft_s": 0.0001})
    runner, url = await start_server(config, tiny_bundle)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/chat/completions", json=body()) as response:
                assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
                error = (await response.json())["error"]
                assert error["code"] == "overloaded" and "interactive" in error["message"]
            async with session.post(f"{url}/v1/chat/completions", json=body(mace_slo="batch")) as response:
                assert response.status == 200
                assert (await response.json())["usage"]["completion_tokens"] == 3
            async with session.post(f"{url}/v1/chat/completions", json=body(mace_slo="gold")) as response:
                assert response.status == 400
                error = (await response.json())["error"]
                assert error["param"] == "mace_slo" and "interactive, batch" in error["message"]
            async with session.get(f"{url}/metrics") as response:
                metrics = metric_values(await response.text())
        assert metrics["mace:requests_shed_total[('slo_class', 'interactive')]"] == 1
        assert metrics["mace:slo_requests_total[('slo_class', 'batch')]"] == 1
        assert metrics["mace:slo_met_total[('slo_class', 'batch')]"] == 1
    finally:
        await runner.cleanup()


async def test_first_come_first_served_never_sheds(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, engine={"shed_queue_depth": 0, "scheduling": "fcfs"}, slo={"ttft_s": 0.0001})
    runner, url = await start_server(config, tiny_bundle)
    try:
        async with aiohttp.ClientSession() as session, \
                session.post(f"{url}/v1/chat/completions", json=body()) as response:
            assert response.status == 200
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
            metrics = metric_values(await response.text())
        assert metrics["mace:slo_violations_total[('kind', 'ttft'), ('slo_class', 'interactive')]"] == 1
    finally:
        await runner.cleanup()
