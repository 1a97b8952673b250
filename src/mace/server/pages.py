"""The browser pages: GET / (chat over /v1/ws) and GET /dashboard (live charts of GET /v1/stats).

Plain HTML, CSS and JavaScript files from `static/`, served as they are: no build step, nothing
fetched from another origin (the machines mace runs on are often offline).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from mace.server.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only this origin's scripts, styles and connections; the pages are never framed by another site.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate, so a new release's pages load after an upgrade
}

routes = web.RouteTableDef()


@routes.get("/")
async def chat_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "chat.html", headers=_HEADERS)


@routes.get("/dashboard")
async def dashboard_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "dashboard.html", headers=_HEADERS)


# Plain names only: nothing outside static/ can be reached, and every file gets the same headers.
_ASSET_NAME = re.compile(r"[a-z][a-z0-9_-]*\.(?:css|js|svg)")


@routes.get("/static/{name}")
async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not _ASSET_NAME.fullmatch(name) or not path.is_file():
        raise ApiError(404, f"no static file {name!r}", code="not_found")
    return web.FileResponse(path, headers=_HEADERS)
