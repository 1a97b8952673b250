"""Liveness, readiness and Prometheus metrics; these never wait on the engine thread."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mace.server.errors import ApiError, dumps
from mace.server.keys import RUNTIME

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=dumps)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if not runtime.is_ready:
        reason = runtime.load_error or "the model is loading"
        raise ApiError(503, f"not ready: {reason}", code="not_ready", retry_after_s=5)
    return web.json_response({"status": "ready", "model": runtime.served_model_name}, dumps=dumps)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
