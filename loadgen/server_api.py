"""The parts of the server's API that the SDK does not cover: POST /v1/feedback and GET /v1/adapters.

Other OpenAI-compatible servers (and older mace servers) answer 404 here: feedback then counts as
failed and adapter polling stops; neither stops the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from mace.client.closing import AsyncClosing


@dataclass(frozen=True)
class FeedbackResult:
    status: int  # the HTTP status; 0 when the server could not be reached
    ids: list[str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ServerApi(AsyncClosing):
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.adapters_supported = True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def feedback(self, samples: Sequence[dict[str, Any]]) -> FeedbackResult:
        """POST /v1/feedback with a list of samples; 202 answers {"ids": [...]}."""
        try:
            async with self._http().post(self.base_url + "/v1/feedback", data=orjson.dumps(list(samples))) as resp:
                raw = await resp.read()
                if resp.status >= 300:
                    return FeedbackResult(resp.status, [], raw[:200].decode("utf-8", "replace"))
                ids = _json(raw).get("ids")
                return FeedbackResult(resp.status, [str(i) for i in ids] if isinstance(ids, list) else [])
        except (aiohttp.ClientError, TimeoutError) as exc:
            return FeedbackResult(0, [], f"{type(exc).__name__}: {exc}")

    async def active_adapter(self) -> int | None:
        """The active adapter version from GET /v1/adapters, or None when unknown. A 404 marks the
        endpoint unsupported so that pollers stop asking."""
        if not self.adapters_supported:
            return None
        try:
            async with self._http().get(self.base_url + "/v1/adapters") as resp:
                if resp.status == 404:
                    self.adapters_supported = False
                    return None
                if resp.status != 200:
                    return None
                return active_version(_json(await resp.read()))
        except (aiohttp.ClientError, TimeoutError):
            return None


def active_version(body: dict[str, Any]) -> int | None:
    """Accepts {"active": 3}, {"active": {"version": 3}} and {"active": "v3"}: the endpoint is new
    and its exact shape may still move."""
    active = body.get("active")
    if isinstance(active, dict):
        active = active.get("version")
    if isinstance(active, str):
        active = active.lstrip("v")
        return int(active) if active.isdigit() else None
    return active if isinstance(active, int) and not isinstance(active, bool) else None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}
