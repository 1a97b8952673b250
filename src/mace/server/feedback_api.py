"""Learning endpoints: POST/GET /v1/feedback (the journal), GET /v1/adapters, POST /v1/adapters/{v}/activate.

Each sample trains the lineage of the tenant it speaks for, and the adapter routes act on one tenant's
lineage (`?tenant=` or `?user=`, by default the caller's own); `auth.resolve_tenant` and
`auth.check_lineage` decide who may name which.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from dataclasses import asdict
from typing import Any

import structlog
from aiohttp import web
from pydantic import Field, model_validator

from mace.engine.api import Journal, NewSample, OwnedElsewhere, RequestRejected
from mace.server.auth import GUARD, PRINCIPAL, Guard, Principal, check_lineage, resolve_tenant
from mace.server.errors import ApiError, dumps
from mace.server.keys import RUNTIME
from mace.server.openai_api import parse_body, read_json
from mace.server.protocol import ChatMessage, _Body
from mace.server.runtime import Runtime
from mace.tenancy import InvalidTenant, check_tenant

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


class FeedbackSample(_Body):
    """`{"prompt", "completion"}`, or `{"messages"}` whose last assistant turn is the wanted answer."""

    prompt: str | None = None
    completion: str | None = None
    messages: list[ChatMessage] | None = None
    request_id: str | None = Field(None, max_length=256)
    user: str | None = Field(None, max_length=256, description="the end user it speaks for (OpenAI's `user`)")
    weight: float = Field(1.0, gt=0, le=100)

    @model_validator(mode="after")
    def _one_form(self) -> FeedbackSample:
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("give either messages or prompt and completion, not both")
            if len(self.messages) < 2 or self.messages[-1].role != "assistant":
                raise ValueError("messages must end with the wanted assistant answer after at least one turn")
            if not self.messages[-1].text.strip() or not any(m.text.strip() for m in self.messages[:-1]):
                raise ValueError("messages have no text")
        elif not (self.prompt and self.prompt.strip() and self.completion and self.completion.strip()):
            raise ValueError("prompt and completion must both be non-empty text")
        return self

    def conversation(self) -> tuple[list[dict[str, str]], str]:
        if self.messages is not None:
            turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                     for m in self.messages[:-1]]
            return turns, self.messages[-1].text
        return [{"role": "user", "content": self.prompt or ""}], self.completion or ""


def _samples(runtime: Runtime, principal: Principal, data: Any) -> list[NewSample]:
    items = data if isinstance(data, list) else [data]
    limit = runtime.config.train.max_samples_per_request
    if not items or len(items) > limit:
        raise ApiError(400, f"send between 1 and {limit} samples per request", param="body")
    tokenizer = runtime.ready_engine().tokenizer
    samples = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and "tenant" in item:  # refused, not ignored: it would otherwise train the key's own
            raise ApiError(400, "a sample cannot name its tenant: send `user` (a key with the act_for_users scope "
                           "acts for its end users)", param=f"{index}.tenant", code="invalid_value")
        sample = parse_body(FeedbackSample, item)
        tenant = resolve_tenant(principal, sample.user)
        turns, answer = sample.conversation()
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        num_tokens = len(tokenizer.encode(prompt + answer, add_special_tokens=False))
        if num_tokens > runtime.config.train.max_sample_tokens:
            raise ApiError(400, f"sample {index} has {num_tokens} tokens; the limit is "
                           f"{runtime.config.train.max_sample_tokens}", param=f"{index}", code="sample_too_long")
        samples.append(NewSample(prompt, answer, request_id=sample.request_id, tenant=tenant or None,
                                 weight=sample.weight))
    return samples


def _journal(runtime: Runtime) -> Journal:
    runtime.ready_engine()
    if runtime.journal is None:
        reason = runtime.journal_error or "it is not open"
        raise ApiError(503, f"the journal cannot store samples: {reason}", code="journal_unavailable",
                       retry_after_s=30)
    return runtime.journal


async def store_feedback(runtime: Runtime, guard: Guard, principal: Principal, data: Any) -> list[int]:
    """Validate one sample or a list, charge them to the key's sample rate, and write them to the journal;
    returns their ids once they are durable. POST /v1/feedback and the websocket's feedback message both
    answer through this, so the two cannot drift apart. Every refusal is raised before anything is
    written (a failed write rolls back), so a 429 or 503 from here is safe to retry."""
    journal = _journal(runtime)
    samples = _samples(runtime, principal, data)
    guard.count_samples(principal, len(samples))
    with guard.feedback_writes.hold("server"):
        try:
            ids = await asyncio.to_thread(journal.append, samples)
        except (sqlite3.Error, OSError) as exc:  # disk full, read-only: serving goes on, feedback waits
            log.warning("journal write failed", error=str(exc), num_samples=len(samples))
            raise ApiError(503, f"the journal cannot store samples now: {exc}", code="journal_unavailable",
                           retry_after_s=30) from None
    runtime.ready_engine().notify_feedback()
    return ids


@routes.post("/v1/feedback")
async def post_feedback(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    _journal(runtime)  # a journal that is down answers 503 before the body is read
    ids = await store_feedback(runtime, request.app[GUARD], request[PRINCIPAL], await read_json(request))
    body = {"object": "feedback.accepted", "ids": ids, "training": training_state(runtime)}
    return web.json_response(body, status=202, dumps=dumps)


@routes.get("/v1/feedback")
async def get_feedback(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    counts = await asyncio.to_thread(_journal(runtime).counts)
    body = {"object": "feedback.counts", **asdict(counts), "training": training_state(runtime),
            "policy": runtime.config.train.policy}
    return web.json_response(body, dumps=dumps)


def training_state(runtime: Runtime) -> str:
    """"on" when journaled samples will be trained; "off" with `train.policy = "none"`, where the journal
    keeps them (for a later start with training on) but nothing learns from them."""
    return "on" if runtime.ready_engine().has_trainer else "off"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _lineage_tenant(request: web.Request) -> str:
    """The tenant an adapter route acts on: `?tenant=NAME` (empty: the shared lineage), `?user=U` (that
    user's, as a generation's `user` field), or the caller's own."""
    principal = request[PRINCIPAL]
    tenant, user = request.query.get("tenant"), request.query.get("user")
    if tenant is not None and user is not None:
        raise ApiError(400, "give tenant or user, not both", param="tenant")
    if user is not None:
        return resolve_tenant(principal, user)
    if tenant is None:
        return principal.tenant
    try:
        return check_tenant(tenant)  # names become directories under the data dir: none may escape it
    except InvalidTenant as exc:
        raise ApiError(400, str(exc), param="tenant", code="invalid_tenant") from None


@routes.get("/v1/adapters")
async def list_adapters(request: web.Request) -> web.Response:
    engine = request.app[RUNTIME].ready_engine()
    tenant = _lineage_tenant(request)
    check_lineage(request[PRINCIPAL], tenant, engine.lineage_of(tenant), change=False)
    catalog = await engine.catalog(tenant)
    versions: list[dict[str, Any]] = [{"version": 0, "name": "base", "serving_loss": None, "learner_loss": None}]
    versions += [{**asdict(v), "serving_loss": _finite(v.serving_loss), "learner_loss": _finite(v.learner_loss)}
                 for v in catalog.versions]
    for version in versions:
        version["active"] = version["version"] == catalog.active
    body = {"object": "list", "tenant": tenant, "active": catalog.active, "auto_publish": catalog.auto_publish,
            "data": versions}
    return web.json_response(body, dumps=dumps)


@routes.post("/v1/adapters/{version}/activate")
async def activate_adapter(request: web.Request) -> web.Response:
    engine = request.app[RUNTIME].ready_engine()
    raw = request.match_info["version"].removeprefix("v")
    if not raw.isdigit():
        raise ApiError(400, "version must be a non-negative integer", param="version")
    version = int(raw)
    tenant = _lineage_tenant(request)
    check_lineage(request[PRINCIPAL], tenant, engine.lineage_of(tenant), change=True)
    if not (await engine.catalog(tenant)).has(version):
        raise ApiError(404, f"adapter version {version} does not exist", param="version", code="adapter_not_found")
    try:
        if engine.has_trainer:
            await engine.activate(version, tenant=tenant)
    except RequestRejected as exc:
        raise ApiError(400, str(exc), param="version") from None
    except OwnedElsewhere as exc:  # replicas on one data dir: the lineage's owner activates its versions
        raise ApiError(409, str(exc), param="version", code="lineage_owned_elsewhere") from None
    return web.json_response({"object": "adapter.activated", "tenant": tenant, "active": version}, dumps=dumps)
