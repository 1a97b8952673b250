"""The HTTP side of the SDK: one aiohttp session per client, JSON calls under the retry policy."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from mace.client.closing import AsyncClosing
from mace.client.errors import MaceError, status_error, translated
from mace.client.retry import RetryPolicy


class HttpTransport(AsyncClosing):
    """Requests to one server: `timeout_s` bounds each whole call; the session opens on first use."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, retry: RetryPolicy) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.retry = retry
        # /health, /ready and /metrics live at the root: accept an OpenAI-style ".../v1" base too.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        """A JSON call under the retry policy."""

        async def once() -> Any:
            status, headers, raw = await self._request(method, path, body)
            if status >= 400:
                raise status_error(status, raw, headers)
            return loads_json(raw, path)

        return await self.retry.run(once)

    async def _get_json(self, path: str) -> Any:
        status, headers, body = await self._request("GET", path)
        if status >= 400:
            raise status_error(status, body, headers)
        return loads_json(body, path)

    async def _request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """One whole request within timeout_s: status, headers, body."""
        data = orjson.dumps(body) if body is not None else None
        with translated(f"{method} {path}"):
            async with self._http().request(
                method, self._url(path), data=data, headers=self._headers(json=data is not None),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                return response.status, response.headers, await response.read()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            # No session-wide total timeout: it would also cut websockets. Each HTTP call sets its own.
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def _headers(self, json: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if json:
            headers["Content-Type"] = "application/json"
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _url(self, path: str) -> str:
        return self.base_url + path


def loads_json(raw: bytes, path: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MaceError(f"{path} answered with something that is not JSON: {raw[:200]!r}") from exc
