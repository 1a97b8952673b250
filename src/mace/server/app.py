"""The aiohttp application factory: routes, middleware, and the runtime's start and stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from mace.config import MaceConfig
from mace.server import feedback_api, health, openai_api, openapi, pages, stats_api, ws
from mace.server.auth import GUARD, Guard, guard_middleware
from mace.server.errors import error_middleware
from mace.server.keys import RUNTIME
from mace.server.runtime import ModelLoad, Runtime


def create_app(config: MaceConfig, load: ModelLoad | None = None) -> web.Application:
    """`load` replaces loading the configured model (tests pass a prepared bundle)."""
    # error_middleware first: the guard's 401/403/429/503 leave as OpenAI-shaped errors.
    app = web.Application(middlewares=[error_middleware, guard_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[RUNTIME] = Runtime(config, load)
    app[GUARD] = Guard(config.server)
    app.add_routes(health.routes)
    app.add_routes(openai_api.routes)
    app.add_routes(ws.routes)
    app.add_routes(feedback_api.routes)
    app.add_routes(openapi.routes)
    app.add_routes(pages.routes)
    stats_api.setup(app)
    app.cleanup_ctx.append(_engine_lifetime)
    return app


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    # The model loads in the background so /health answers (and /ready says 503) meanwhile.
    runtime = app[RUNTIME]
    loading = asyncio.create_task(runtime.start())
    yield
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    runtime.stop()
