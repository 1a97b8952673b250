"""A scripted OpenAI-style server for the loadgen tests; `python -m tests.loadgen.fake_server --port P`
runs it as a process, standing in for `mace serve` in the compare test (it refuses the policy "broken",
as mace refuses a bad MACE_TRAIN__POLICY)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import orjson
from aiohttp import web


def fake_app(chunk_delay_s: float = 0.02) -> web.Application:
    """An OpenAI-style server without /v1/feedback or /v1/adapters (both 404). Its chat stream sends
    "ok", " fine", " done" and a finish; a message containing FAIL gets an error event after the
    first chunk instead, as mace sends when the engine fails mid-stream."""
    routes = web.RouteTableDef()

    @routes.get("/ready")
    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        policy = os.environ.get("MACE_TRAIN__POLICY", "none")
        tokens = 0 if policy == "none" else 300
        text = (f"mace:train_tokens_total {tokens}.0\nmace:train_optimizer_steps_total {tokens // 100}.0\n"
                "mace:heldout_loss_serving 2.5\nmace:heldout_loss_learner NaN\n")
        return web.Response(text=text, content_type="text/plain")

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    @routes.post("/v1/chat/completions")
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": "chatcmpl-f"})
        await response.prepare(request)
        fail = "FAIL" in orjson.dumps(body["messages"]).decode()
        base = {"id": "chatcmpl-f", "object": "chat.completion.chunk", "model": "fake",
                "system_fingerprint": "mace-adapter-v5"}
        for index, text in enumerate(("ok", " fine", " done")):
            await asyncio.sleep(chunk_delay_s)
            if fail and index == 1:
                error = {"message": "engine failed", "type": "server_error", "param": None, "code": "engine_error"}
                await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
                break
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": "length" if index == 2 else None}
            await response.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
        else:
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.add_routes(routes)
    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if os.environ.get("MACE_TRAIN__POLICY") == "broken":
        print("invalid configuration: train.policy", file=sys.stderr)
        return 2
    web.run_app(fake_app(), host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
