"""For people who already use locust: `locust -f loadgen/locustfile.py --host http://127.0.0.1:8000`.

Streaming chat against /v1/chat/completions with the prompts of a built-in drift trace
(LOADGEN_TRACE=personalization|moderation|tenants, LOADGEN_SEED; LOADGEN_MODEL, else the server's first
model; LOADGEN_API_KEY when the server has keys); a tenants item is sent with its tenant as `user`. Each
request makes two entries in locust's tables and charts: "/v1/chat/completions (stream)" times the
whole stream, from sending the request to its last event, and "TTFT" the time to its first token. A
stream that ends with an error event, breaks off, or brings no text is a failure.

It imports loadgen's traces, so locust must run where mace is installed: `make install` puts locust in
the project's venv (it is a dev extra), or `pip install locust` next to mace. loadgen itself does not
need locust; `python -m loadgen run` is the asyncio equivalent with more metrics.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import requests
from locust import HttpUser, between, task
from locust.clients import ResponseContextManager

from loadgen.traces import DriftSpec, TraceItem, builtin

STREAM_NAME = "/v1/chat/completions (stream)"
_ITEMS = builtin(os.environ.get("LOADGEN_TRACE", "personalization"),
                 DriftSpec(seed=int(os.environ.get("LOADGEN_SEED", "0"))))
_CYCLE: Iterator[TraceItem] = itertools.cycle(_ITEMS)  # shared by all users: the trace's order


class StreamingChatUser(HttpUser):
    wait_time = between(0.5, 2.0)
    model = os.environ.get("LOADGEN_MODEL", "")

    def on_start(self) -> None:
        api_key = os.environ.get("LOADGEN_API_KEY")
        if api_key:
            self.client.headers["Authorization"] = f"Bearer {api_key}"
        if not self.model:
            models = self.client.get("/v1/models", name="/v1/models").json()
            self.model = models["data"][0]["id"]

    @task
    def chat(self) -> None:
        item = next(_CYCLE)
        body = {"model": self.model, "messages": item.messages, "max_tokens": item.max_tokens, "stream": True,
                "temperature": 0.0}
        if item.tenant is not None:
            body["user"] = item.tenant
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name=STREAM_NAME) as response:
            try:
                ttft_s = _consume(response, started)
            finally:
                # locust stops the request's clock at the response headers; the entry is the whole stream.
                response.request_meta["response_time"] = (time.perf_counter() - started) * 1000.0
        if ttft_s is not None:  # a custom entry: locust aggregates it like any request type (milliseconds)
            self.environment.events.request.fire(
                request_type="TTFT", name="/v1/chat/completions", response_time=ttft_s * 1000.0, response_length=0,
                exception=None, context={},
            )


def _consume(response: ResponseContextManager, started: float) -> float | None:
    """Read the stream to its end and mark the request; returns the TTFT of a successful one."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return None
    ttft_s: float | None = None
    num_bytes = 0
    try:
        for line in response.iter_lines():
            num_bytes += len(line) + 1
            data = line.removeprefix(b"data:").strip() if line.startswith(b"data:") else b""
            if not data or data == b"[DONE]":
                continue
            chunk: dict[str, Any] = json.loads(data)
            if "error" in chunk:
                response.failure(f"error event: {chunk['error'].get('message')}")
                return None
            choices = chunk.get("choices") or [{}]
            if ttft_s is None and (choices[0].get("delta") or {}).get("content"):
                ttft_s = time.perf_counter() - started
    except (requests.RequestException, ValueError) as exc:  # a broken stream, a malformed event
        response.failure(f"the stream broke off: {type(exc).__name__}: {exc}")
        return None
    response.request_meta["response_length"] = num_bytes
    if ttft_s is None:
        response.failure("the stream brought no text")
        return None
    response.success()
    return ttft_s
