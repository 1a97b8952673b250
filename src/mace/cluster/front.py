"""The cluster's one port: every request goes to a replica through its Ray Serve deployment handle.

The front end owns no route of the API. It picks a replica by tenant (`Affinity`: the tenant the API
key and the OpenAI `user` name; no tenant: Serve spreads by load), relays the
request through `MaceReplica.relay` and streams the answer back as the replica writes it. A replica
that dies before it answered is retried once, on another. Websockets connect to the chosen replica's
address and are piped both ways. Beside that it answers what is about the fleet: `/health`,
`/ready` (every replica ready), `/cluster/replicas`, and `/metrics` (every replica's, labelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
import orjson
import structlog
from aiohttp import WSMsgType, web
from prometheus_client.parser import text_string_to_metric_families
from ray import exceptions as ray_exceptions
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from mace.cluster import NOT_RELAYED_HEADERS
from mace.config import MaceConfig, ServerConfig
from mace.server.auth import hash_key

log = structlog.get_logger(__name__)

REPLICA_HEADER = "X-Mace-Replica"
PROBE_TIMEOUT_S = 2.0

Replicas = Callable[[], Awaitable[list[dict[str, Any]]]]  # each live replica's `info`


class Affinity:
    """Who a request speaks for, as a routing key ('' for no one): its lineage's name, resolved as the
    replica will resolve it (the API key's tenant, and the OpenAI `user` of the body, of its first
    feedback sample, or of the query). The replica still checks every key and scope itself."""

    def __init__(self, config: ServerConfig) -> None:
        self._tenants = {key.sha256: key.tenant_name for key in config.api_keys}

    def key(self, request: web.Request, body: bytes) -> str:
        user = request.query.get("user") or request.query.get("tenant") or ""
        if body and request.content_type == "application/json":
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None  # the replica answers the 400
            first = parsed[0] if isinstance(parsed, list) and parsed else parsed
            if isinstance(first, dict) and isinstance(first.get("user"), str):
                user = first["user"]
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # Without keys a bearer token names no one (the SDKs send one anyway): `user` alone does.
        key_tenant = self._tenants.get(hash_key(token), "") if token and self._tenants else ""
        if key_tenant and user:
            return f"{key_tenant}/{user}"
        return key_tenant or user


def create_front(config: MaceConfig, handle: DeploymentHandle[Any], replicas: Replicas,
                 expected: int) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    front = _Front(handle, replicas, expected, Affinity(config.server))
    app.router.add_get("/health", front.health)
    app.router.add_get("/ready", front.ready)
    app.router.add_get("/cluster/replicas", front.list_replicas)
    app.router.add_get("/metrics", front.metrics)
    app.router.add_route("*", "/{tail:.*}", front.relay)
    app.on_cleanup.append(front.close)
    return app


class _Front:
    def __init__(self, handle: DeploymentHandle[Any], replicas: Replicas, expected: int, affinity: Affinity) -> None:
        self.handle = handle
        self.affinity = affinity
        self.replicas = replicas
        self.expected = expected
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- the fleet ----

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "replicas": self.expected})

    async def list_replicas(self, _: web.Request) -> web.Response:
        """Each replica: its id, address, whether it is ready, and its load (from its own /metrics)."""
        probed = await self._probe("/ready")
        scraped = dict(await asyncio.gather(*(self._scrape(replica) for replica in probed)))
        data = [{**replica, **load_of(scraped.get(replica["replica"], ""))} for replica in probed]
        return web.json_response({"object": "list", "data": data})

    async def ready(self, _: web.Request) -> web.Response:
        probed = await self._probe("/ready")
        ready = sum(1 for replica in probed if replica["ready"])
        status = 200 if ready >= self.expected else 503
        return web.json_response({"status": "ready" if status == 200 else "not ready", "ready_replicas": ready,
                                  "replicas": self.expected}, status=status)

    async def _probe(self, path: str) -> list[dict[str, Any]]:
        async def probe(replica: dict[str, Any]) -> dict[str, Any]:
            try:
                async with self.session.get(f"http://{replica['address']}{path}",
                                            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
                    return {**replica, "ready": response.status == 200}
            except (aiohttp.ClientError, TimeoutError):
                return {**replica, "ready": False}

        return list(await asyncio.gather(*(probe(replica) for replica in await self.replicas())))

    async def _scrape(self, replica: dict[str, Any]) -> tuple[str, str]:
        try:
            async with self.session.get(f"http://{replica['address']}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
                return replica["replica"], await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return replica["replica"], ""

    async def metrics(self, _: web.Request) -> web.Response:
        """Every replica's metrics, each sample labelled with its `replica`."""
        scraped = await asyncio.gather(*(self._scrape(replica) for replica in await self.replicas()))
        return web.Response(text=merge_metrics(scraped), content_type="text/plain", charset="utf-8")

    # ---- the API, relayed ----

    async def relay(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._pipe_websocket(request)
        body = await request.read()
        key = self.affinity.key(request, body)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_RELAYED_HEADERS]
        for attempt in (1, 2):
            stream = cast(DeploymentResponseGenerator[Any], self.handle.options(
                stream=True, multiplexed_model_id=key).relay.remote(request.method, request.path_qs, headers, body))
            try:
                head = await stream.__anext__()
            except (ray_exceptions.RayError, StopAsyncIteration) as exc:
                # Nothing was answered yet, so nothing is lost by asking another replica once.
                log.warning("replica failed before it answered", attempt=attempt, error=type(exc).__name__)
                if attempt == 2:
                    return _unavailable()
                continue
            return await self._stream(request, head, stream)
        return _unavailable()

    async def _stream(self, request: web.Request, head: Any,
                      stream: DeploymentResponseGenerator[Any]) -> web.StreamResponse:
        response = web.StreamResponse(status=head["status"], headers=head["headers"])
        response.headers[REPLICA_HEADER] = head["replica"]
        await response.prepare(request)
        try:
            async for chunk in stream:
                await response.write(chunk)
        except ray_exceptions.RayError as exc:  # the replica died mid-answer: the client sees the stream cut
            log.warning("replica failed while it answered", error=type(exc).__name__)
            return response
        await response.write_eof()
        return response

    async def _pipe_websocket(self, request: web.Request) -> web.StreamResponse:
        try:
            info = await self.handle.options(multiplexed_model_id=self.affinity.key(request, b"")).info.remote()
        except ray_exceptions.RayError as exc:
            log.warning("no replica for a websocket", error=type(exc).__name__)
            return _unavailable()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "origin", "cookie")}
        client = web.WebSocketResponse(max_msg_size=0)
        try:
            upstream = await self.session.ws_connect(f"ws://{info['address']}{request.path_qs}", headers=headers,
                                                     max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:  # the replica refused it (401, 403, 429 ...)
            return web.json_response({"error": {"message": exc.message, "type": "invalid_request_error"}},
                                     status=exc.status)
        client.headers[REPLICA_HEADER] = info["replica"]
        await client.prepare(request)
        async with upstream:
            await asyncio.gather(_pipe(client, upstream), _pipe(upstream, client))
        return client


async def _pipe(source: Any, sink: Any) -> None:
    async for message in source:
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            break
    await sink.close(code=source.close_code or 1000)


def _unavailable() -> web.Response:
    body = {"error": {"message": "no replica could answer; retry shortly", "type": "server_error",
                      "code": "replica_unavailable", "param": None}}
    return web.json_response(body, status=503, headers={"Retry-After": "2"})


def merge_metrics(scraped: list[tuple[str, str]]) -> str:
    """Prometheus text of several replicas as one exposition: each family once, every sample with a
    `replica` label."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in scraped:
        for family in text_string_to_metric_families(text):
            _, _, lines = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{rendered}}} {_number(sample.value)}")
    out = []
    for name, (kind, documentation, lines) in families.items():
        exposed = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes them
        out.append(f"# HELP {exposed} {documentation}")
        out.append(f"# TYPE {exposed} {'untyped' if kind == 'unknown' else kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


# The load a replica reports, by the /metrics gauge it comes from.
LOAD_GAUGES = {"running": "mace:num_requests_running", "waiting": "mace:num_requests_waiting",
               "kv_usage": "mace:kv_cache_usage_perc", "adapter_version": "mace:adapter_active_version"}


def load_of(metrics_text: str) -> dict[str, float | None]:
    """A replica's load from its /metrics text (None for what it did not report)."""
    values = {family.name: family.samples[0].value
              for family in text_string_to_metric_families(metrics_text) if family.samples}
    return {field: values.get(gauge) for field, gauge in LOAD_GAUGES.items()}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value == value else "NaN"
