"""Typed application state keys."""

from aiohttp import web

from mace.server.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
