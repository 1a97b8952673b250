"""Typed errors of the client SDK.

    MaceError
    ├── APIStatusError            the server answered 4xx/5xx with {"error": {message, type, param, code}}
    │   ├── BadRequestError           400
    │   ├── AuthenticationError       401
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404
    │   ├── RateLimitError            429 (retry_after_s from Retry-After)
    │   └── ServerError               5xx
    │       └── ServiceUnavailableError   503 (retry_after_s from Retry-After)
    ├── APIConnectionError        the server could not be reached, or the connection broke mid-response
    │   └── APITimeoutError           no answer (or no stream data) within the client's timeout
    └── StreamError               an error event arrived inside a stream (SSE or websocket)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson


class MaceError(Exception):
    """Base class of every error the SDK raises."""


class APIStatusError(MaceError):
    """The server answered with an error status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {message}" + (f" (param: {param})" if param else ""))
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s


class BadRequestError(APIStatusError):
    """400: the request is invalid; `param` names the offending field when the server knows it."""


class AuthenticationError(APIStatusError):
    """401."""


class PermissionDeniedError(APIStatusError):
    """403: the API key lacks the scope the call needs (code "insufficient_scope")."""


class NotFoundError(APIStatusError):
    """404: an unknown route or an unknown model."""


class RateLimitError(APIStatusError):
    """429: the server is at capacity, or the key sent more than its rate; retry after `retry_after_s`
    seconds when it says."""


class ServerError(APIStatusError):
    """5xx."""


class ServiceUnavailableError(ServerError):
    """503: the server is not ready (model loading), is shutting down, or its feedback journal cannot
    store samples (code "journal_unavailable"); `retry_after_s` when it says."""


class APIConnectionError(MaceError):
    """The server is unreachable, or the connection broke before the response was complete."""


class APITimeoutError(APIConnectionError):
    """The server did not answer (or a stream stayed silent) within the client's timeout."""


class StreamError(MaceError):
    """An error event arrived inside a stream after it had begun (HTTP SSE or websocket)."""

    def __init__(
        self, message: str, type: str | None = None, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message + (f" (code: {code})" if code else ""))
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @classmethod
    def from_payload(cls, payload: Any) -> StreamError:
        """From the `error` object of an event: {"message", "type", "param", "code"}."""
        fields = payload if isinstance(payload, dict) else {}
        return cls(
            str(fields.get("message") or "stream error"),
            type=_str_or_none(fields.get("type")),
            param=_str_or_none(fields.get("param")),
            code=_str_or_none(fields.get("code")),
        )


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error(status: int, body: bytes, headers: Mapping[str, str]) -> APIStatusError:
    """The typed error for an error response; tolerates bodies that are not OpenAI-shaped."""
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    fields: dict[str, Any] = {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        fields = parsed["error"]
        message = str(fields.get("message") or message)
    return _typed(status, message, fields, _retry_after(headers.get("Retry-After")))


def event_error(event: Mapping[str, Any]) -> MaceError:
    """The error of a websocket `error` message. One that names an HTTP-like `status` (the server does
    for feedback and admission errors) becomes the same typed error as over HTTP, with `retry_after_s`
    from the message; one without a status is a StreamError."""
    fields = event.get("error")
    status = event.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not isinstance(fields, dict):
        return StreamError.from_payload(fields)
    retry_after = event.get("retry_after_s")
    retry_after_s = float(retry_after) if isinstance(retry_after, int | float) and retry_after >= 0 else None
    return _typed(status, str(fields.get("message") or f"error {status}"), fields, retry_after_s)


def _typed(status: int, message: str, fields: Mapping[str, Any], retry_after_s: float | None) -> APIStatusError:
    error_class = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    return error_class(
        status,
        message,
        type=_str_or_none(fields.get("type")),
        param=_str_or_none(fields.get("param")),
        code=_str_or_none(fields.get("code")),
        retry_after_s=retry_after_s,
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by mace and is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn aiohttp's and asyncio's exceptions into the SDK's; `what` names the operation."""
    try:
        yield
    except MaceError:
        raise
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError and its subclasses are TimeoutErrors too
        raise APITimeoutError(f"{what}: timed out") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise APIConnectionError(f"{what}: {type(exc).__name__}: {exc}") from exc
