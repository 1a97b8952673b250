"""A scripted OpenAI-style server for the loadgen tests; `python -m tests.loadgen.fake_server --port P`
runs it as a process, standing in for `mace serve` in the compare test (it refuses the policy "broken",
as mace refuses a bad MACE_TRAIN__POLICY). With `--teachable` it learns feedback by heart, per tenant
(OpenAI's `user`) unless MACE_TRAIN__TENANCY=shared, and not at all under MACE_TRAIN__POLICY=none."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import orjson
from aiohttp import web

# What a teachable fake received: the `user` of each chat request and of each feedback sample (None: absent).
SEEN = web.AppKey("seen", dict[str, list[Any]])


def _question(messages: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)


def fake_app(chunk_delay_s: float = 0.02, teachable: bool = False, shared: bool = False,
             learns: bool = True) -> web.Application:
    """An OpenAI-style server without /v1/feedback or /v1/adapters (both 404). Its chat stream sends
    "ok", " fine", " done" and a finish; a message containing FAIL gets an error event after the
    first chunk instead, as mace sends when the engine fails mid-stream.

    `teachable`: POST /v1/feedback accepts samples, and (if `learns`) a chat whose messages match a
    sample's question answers the sample's answer, in one chunk. What a tenant (the `user` field)
    taught answers only that tenant, unless `shared`: then everyone, as one shared lineage would. The
    fingerprint's version is how many answers the asker's lineage has learned."""
    routes = web.RouteTableDef()
    learned: dict[tuple[str, bytes], str] = {}
    seen: dict[str, list[Any]] = {"chat": [], "feedback": []}

    def lineage(user: Any) -> str:
        return "" if shared or not isinstance(user, str) else user

    if teachable:
        @routes.post("/v1/feedback")
        async def feedback(request: web.Request) -> web.Response:
            body = await request.json()
            samples = body if isinstance(body, list) else [body]
            for sample in samples:
                seen["feedback"].append(sample.get("user"))
                messages = sample["messages"]
                if learns:
                    learned[(lineage(sample.get("user")), _question(messages[:-1]))] = messages[-1]["content"]
            ids = list(range(len(seen["feedback"]) - len(samples) + 1, len(seen["feedback"]) + 1))
            return web.json_response({"object": "feedback.accepted", "ids": ids}, status=202)

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
        pieces: tuple[str, ...] = ("ok", " fine", " done")
        version = 5
        if teachable:
            seen["chat"].append(body.get("user"))
            scope = lineage(body.get("user"))
            answer = learned.get((scope, _question(body["messages"])))
            pieces = pieces if answer is None else (answer,)
            version = sum(key[0] == scope for key in learned)
        base = {"id": "chatcmpl-f", "object": "chat.completion.chunk", "model": "fake",
                "system_fingerprint": f"mace-adapter-v{version}"}
        for index, text in enumerate(pieces):
            await asyncio.sleep(chunk_delay_s)
            if fail and index == 1:
                error = {"message": "engine failed", "type": "server_error", "param": None, "code": "engine_error"}
                await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
                break
            last = index == len(pieces) - 1
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": "length" if last else None}
            await response.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
        else:
            usage = {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
            await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app[SEEN] = seen
    app.add_routes(routes)
    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--teachable", action="store_true")
    args = parser.parse_args()
    policy = os.environ.get("MACE_TRAIN__POLICY")
    if policy == "broken":
        print("invalid configuration: train.policy", file=sys.stderr)
        return 2
    app = fake_app(teachable=args.teachable, shared=os.environ.get("MACE_TRAIN__TENANCY") == "shared",
                   learns=policy != "none")
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
