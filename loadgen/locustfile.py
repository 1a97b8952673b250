"""For people who already use locust: `locust -f loadgen/locustfile.py --host http://127.0.0.1:8000`.

Streaming chat against /v1/chat/completions with the prompts of a built-in drift trace
(LOADGEN_TRACE=personalization|moderation, LOADGEN_SEED). Besides locust's own request entry (the
whole stream), each request reports its time to first token as a custom entry of type "TTFT", so
locust's tables and charts show TTFT percentiles next to end-to-end times. A stream that ends with an
error event is a failure. loadgen itself does not need locust; `python -m loadgen run` is the asyncio
equivalent with more metrics.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from locust import HttpUser, between, task

from loadgen.traces import DriftSpec, TraceItem, builtin

_ITEMS = builtin(os.environ.get("LOADGEN_TRACE", "personalization"),
                 DriftSpec(seed=int(os.environ.get("LOADGEN_SEED", "0"))))
_CYCLE: Iterator[TraceItem] = itertools.cycle(_ITEMS)  # shared by all users: the trace's order


class StreamingChatUser(HttpUser):
    wait_time = between(0.5, 2.0)
    model = os.environ.get("LOADGEN_MODEL", "")

    def on_start(self) -> None:
        if not self.model:
            models = self.client.get("/v1/models", name="/v1/models").json()
            self.model = models["data"][0]["id"]

    @task
    def chat(self) -> None:
        item = next(_CYCLE)
        body = {"model": self.model, "messages": item.messages, "max_tokens": item.max_tokens, "stream": True,
                "temperature": 0.0}
        started = time.perf_counter()
        ttft: float | None = None
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="/v1/chat/completions (stream)") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk: dict[str, Any] = json.loads(line[len(b"data: "):])
                if "error" in chunk:
                    response.failure(f"error event: {chunk['error'].get('message')}")
                    return
                choices = chunk.get("choices") or [{}]
                if ttft is None and (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - started
            if ttft is None:
                response.failure("no token")
                return
            response.success()
        # The custom metric: locust aggregates it like any request type (milliseconds).
        self.environment.events.request.fire(
            request_type="TTFT", name="/v1/chat/completions", response_time=ttft * 1000.0, response_length=0,
            exception=None, context={},
        )
