"""One replica: a whole `mace serve` (model, scheduler, trainer, the same aiohttp routes) in a Ray
Serve deployment, reached through the deployment's handle.

The replica runs the single-process server unchanged, on its own thread and uvloop loop, bound to a
private port (loopback on a one-host cluster, the node's address on a multi-host one). Its handle
methods relay one HTTP exchange each (`relay`: the response head, then the body as it streams), so
the front end (cluster/front.py) never duplicates a route: every request is answered by the code that
answers it under `mace serve`. Websockets, which a handle cannot carry both ways, connect to the
replica's `address` directly.

`relay` is multiplexed by tenant (`serve.multiplexed`): Serve sends a tenant's requests to the replica
that has served it, the one that holds its lineage's lease (train/lease.py). Serve's routing is a
preference, not a guarantee; a request that lands elsewhere is served by a follower of the lineage.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from ray import serve

from mace.cluster import NOT_RELAYED_HEADERS, registry
from mace.config import MaceConfig
from mace.logging import configure_logging
from mace.server.app import create_app

MAX_TENANTS_PER_REPLICA = 100_000  # Serve's LRU of model ids: routing hints only, nothing is loaded by it


class ReplicaServer:
    """`mace serve`'s aiohttp app on a thread of its own, started and stopped from any thread."""

    def __init__(self, config: MaceConfig, host: str) -> None:
        self.config = config
        self.host = host
        self.port = 0
        self._loop = uvloop.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="mace-replica-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = create_app(self.config)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Drain as `mace serve` does on SIGTERM, then stop the engine (which checkpoints the trainer)."""
        if self._runner is None or not self._thread.is_alive():
            return
        runner = self._runner

        async def stop() -> None:
            from mace.server.keys import RUNTIME

            await runner.app[RUNTIME].drain(self.config.server.drain_timeout_s)
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


@serve.deployment(name="mace", max_ongoing_requests=1024, health_check_period_s=2, health_check_timeout_s=10)
class MaceReplica:
    def __init__(self, config: MaceConfig, bind_host: str, log_level: str = "info") -> None:
        configure_logging(log_level)
        host = bind_host or _node_address()
        self.config = config
        self.server = ReplicaServer(config, host)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._session: aiohttp.ClientSession | None = None
        registry.register(config.data_dir, self.replica_id, self.address)

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @serve.multiplexed(max_num_models_per_replica=MAX_TENANTS_PER_REPLICA)
    async def _tenant(self, tenant: str) -> str:
        """Serve asks this for a tenant the replica has not served yet; it only marks the tenant as
        here, for routing: its lineage is read by the engine when its request arrives."""
        return tenant

    async def info(self) -> dict[str, Any]:
        tenant = serve.get_multiplexed_model_id()
        if tenant:
            await self._tenant(tenant)
        return {"replica": self.replica_id, "pid": os.getpid(), "address": self.address}

    async def relay(self, method: str, path_qs: str, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        """One HTTP exchange with this replica's server: first the head ({status, headers, replica}),
        then the body's chunks as the server writes them (an SSE stream token by token)."""
        tenant = serve.get_multiplexed_model_id()
        if tenant:
            await self._tenant(tenant)
        session = self._session
        if session is None or session.closed:
            # No timeout of its own: a stream lasts as long as its generation; the client's disconnect
            # cancels this generator, which closes the upstream request and so aborts the generation.
            session = self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                            auto_decompress=False)
        url = f"http://{self.address}{path_qs}"
        async with session.request(method, url, headers=headers, data=body or None, allow_redirects=False) as response:
            yield {"status": response.status, "replica": self.replica_id,
                   "headers": [(k, v) for k, v in response.headers.items() if k.lower() not in NOT_RELAYED_HEADERS]}
            async for chunk in response.content.iter_any():
                yield chunk

    async def check_health(self) -> None:
        """Serve restarts a replica whose server thread has died."""
        if not self.server.is_alive:
            raise RuntimeError("the replica's server thread has stopped")

    async def __del__(self) -> None:
        registry.unregister(self.config.data_dir, self.replica_id)
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self.server.stop)


def _node_address() -> str:
    import ray

    return str(ray.util.get_node_ip_address())
