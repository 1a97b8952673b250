"""API keys, scopes and the middleware that admits a request: shutdown state, key, scope, rate limit;
and the tenant a request speaks for (mace/tenancy.py).

Keys arrive as `Authorization: Bearer <key>` (the websocket upgrade may use `?api_key=` instead, as
browsers cannot set headers there); only their sha256 digests are held. Scopes: `infer` (generation,
models, adapters list, websocket), `train` (feedback, and activating a version of the key's own
lineages), `act_for_users` (OpenAI's `user` field names an end user of the key's tenant), `admin`
(every lineage, the shared one included; an admin key may do everything). /health, /ready, /metrics,
/openapi.json and pages outside /v1/ stay open. With no keys configured every request is admitted as
`anonymous` without rate limits, which is only allowed on a loopback address (see `check_bind`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from mace.config import SCOPES, Scope, ServerConfig
from mace.server.errors import ApiError
from mace.server.keys import RUNTIME
from mace.server.limits import ConcurrencyCap, KeyLimiter
from mace.tenancy import SHARED, InvalidTenant, acts_for, check_segment, for_user

log = structlog.get_logger(__name__)

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
WEBSOCKET_PATH = "/v1/ws"


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's name (never the key), its scopes, its rate limits and its tenant."""

    name: str
    scopes: frozenset[Scope]
    requests_per_minute: float = 0.0
    samples_per_minute: float = 0.0
    tenant: str = SHARED

    @property
    def is_anonymous(self) -> bool:
        return self is ANONYMOUS  # not by name: a key may be called "anonymous"

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))
PRINCIPAL = web.RequestKey("principal", Principal)


def resolve_tenant(principal: Principal, user: str | None) -> str:
    """The tenant a request or sample of `principal` speaks for, given OpenAI's `user` field: the key's
    own without one; on a server without keys, `user` alone; otherwise `KEY_TENANT/user`, which needs the
    `act_for_users` scope so that a key cannot write into, or be served from, another's lineage."""
    if user is None:
        return principal.tenant
    try:
        if principal.is_anonymous:
            return check_segment(user)
        if not principal.allows("act_for_users"):
            raise ApiError(403, "this API key lacks the 'act_for_users' scope needed to send `user`: without it, "
                           "requests and samples use the key's own tenant", param="user", code="insufficient_scope")
        return for_user(principal.tenant, user)
    except InvalidTenant as exc:
        raise ApiError(400, str(exc), param="user", code="invalid_user") from None


def may_list(principal: Principal, tenant: str) -> bool:
    """Whether `principal` may read `tenant`'s lineage: admin any; a key its own and, with `act_for_users`,
    its users'; everyone the shared lineage, which serves everyone."""
    return (principal.allows("admin") or tenant in (SHARED, principal.tenant)
            or ("act_for_users" in principal.scopes and acts_for(principal.tenant, tenant)))


def check_lineage(principal: Principal, tenant: str, lineage: str, change: bool) -> None:
    """Raise ApiError 403 unless `principal` may list (`change` False) or activate versions of `tenant`'s
    lineage; `lineage` is the one the engine maps it to. Changing needs what reading does, and admin for
    the shared lineage (under `train.tenancy = "shared"` every tenant's maps to it)."""
    if principal.allows("admin"):
        return
    if change and lineage == SHARED:
        raise ApiError(403, "activating a version of the shared lineage needs the 'admin' scope: it serves every "
                       "request without a lineage of its own", param="tenant", code="insufficient_scope")
    if not may_list(principal, tenant):
        verb = "activate" if change else "list"
        raise ApiError(403, f"this API key may not {verb} the versions of tenant {tenant!r}", param="tenant",
                       code="forbidden_tenant")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def required_scope(method: str, path: str) -> Scope | None:
    """The scope a route needs, or None for the open ones."""
    if not path.startswith("/v1/"):
        return None
    if path.startswith("/v1/feedback"):
        return "train"
    if path.startswith("/v1/adapters/") and method not in ("GET", "HEAD", "OPTIONS"):
        return "train"  # and the lineage's owner or admin: `check_lineage`, once the tenant is known
    return "infer"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(config: ServerConfig) -> str | None:
    """Why the server must not start on `config.host`, or None when it may."""
    if config.api_keys or is_loopback(config.host) or config.allow_unauthenticated:
        return None
    return (f"refusing to serve {config.host!r} without API keys: anyone who can reach it could generate, "
            "train and roll back adapters. Set MACE_SERVER__API_KEYS (or server.api_keys), bind 127.0.0.1, "
            "or force it with --allow-unauthenticated (server.allow_unauthenticated = true).")


class Guard:
    """The key ring and the per-key limits; one per app."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._keys = {
            key.sha256: Principal(
                key.display_name,
                frozenset(key.scopes),
                config.requests_per_minute if key.requests_per_minute is None else key.requests_per_minute,
                config.samples_per_minute if key.samples_per_minute is None else key.samples_per_minute,
                key.tenant_name,
            )
            for key in config.api_keys
        }
        self.requests = KeyLimiter("requests", config.requests_burst)
        self.samples = KeyLimiter("feedback samples", config.samples_burst)
        self.streams = ConcurrencyCap(config.max_streams_per_key, "generations")
        # One cap for the whole server: journal writes queue on one lock, so a flood must not pile up.
        self.feedback_writes = ConcurrencyCap(config.max_pending_feedback, "feedback writes", "the server",
                                              code="too_many_pending_writes")

    @property
    def is_open(self) -> bool:
        return not self._keys

    def authenticate(self, request: web.Request, scope: Scope) -> Principal:
        if self.is_open:
            return ANONYMOUS
        token = _token(request)
        if token is None:
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'", code="missing_api_key")
        principal = self._keys.get(hash_key(token))
        if principal is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if not principal.allows(scope):
            raise ApiError(403, f"this API key lacks the '{scope}' scope needed for {request.method} {request.path}",
                           code="insufficient_scope")
        return principal

    def count_request(self, principal: Principal) -> None:
        if not principal.is_anonymous:
            self.requests.check(principal.name, principal.requests_per_minute)

    def count_samples(self, principal: Principal, num_samples: int) -> None:
        if not principal.is_anonymous:
            self.samples.check(principal.name, principal.samples_per_minute, cost=num_samples)

    def start_stream(self, principal: Principal) -> None:
        if not principal.is_anonymous:
            self.streams.acquire(principal.name)

    def end_stream(self, principal: Principal) -> None:
        if not principal.is_anonymous:
            self.streams.release(principal.name)


GUARD = web.AppKey("guard", Guard)


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if request.path == WEBSOCKET_PATH:
        return request.query.get("api_key") or None
    return None


@web.middleware
async def guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    scope = required_scope(request.method, request.path)
    if scope is None:
        return await handler(request)
    runtime = request.app[RUNTIME]
    guard = request.app[GUARD]
    is_generation = request.method == "POST" and request.path in GENERATION_PATHS
    if not is_generation:  # a generation's shutdown check is the first of `AsyncEngine.admit`'s
        runtime.check_open()
    principal = guard.authenticate(request, scope)
    guard.count_request(principal)
    request[PRINCIPAL] = principal
    if request.path == WEBSOCKET_PATH:
        return await handler(request)  # a socket lives long: its conversations are counted one by one
    with runtime.in_flight():
        if not is_generation:
            return await handler(request)
        guard.start_stream(principal)
        try:
            return await handler(request)
        finally:
            guard.end_stream(principal)
