"""Starting and stopping the cluster: Ray (joined at `RAY_ADDRESS`, else a local one), the replicas'
deployment, and the front end on the configured host and port.

Every replica gets the same configuration, the one `mace serve` resolved from its defaults, config
file, variables and flags, so `data_dir` must be a directory every replica reaches (on one host it
is; across hosts, a shared file system with working `flock`, train/lease.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import structlog
import uvloop
from aiohttp import web

from mace.config import MaceConfig

log = structlog.get_logger("mace.cluster")


class ClusterUnavailable(RuntimeError):
    """`--replicas` cannot start: Ray is not installed, or it did not start."""


def serve_cluster(config: MaceConfig, replicas: int, log_level: str = "info", attach: bool = False) -> None:
    """Deploy `replicas` replicas and serve the front end until SIGTERM or SIGINT, then stop them; or,
    `attach`, serve the front end of replicas deployed already (a RayService) and leave them running."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ClusterUnavailable(f"--replicas needs Ray Serve, which is not installed ({exc}); install it with "
                                 "`pip install 'mace[cluster]'`, or run `mace serve` without --replicas") from None
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        serve.start(proxy_location="Disabled")  # the front end is the only ingress
    except Exception as exc:
        raise ClusterUnavailable(f"Ray did not start ({type(exc).__name__}: {exc})") from None
    from mace.cluster.app import APP_NAME

    try:
        local = address is None
        handle = serve.get_app_handle(APP_NAME) if attach else _deploy(config, replicas, local, log_level)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_front(config, handle, replicas))
    finally:
        if not attach:
            _stop_replicas(config)
            serve.shutdown()
        ray.shutdown()
    log.info("stopped")


def _stop_replicas(config: MaceConfig) -> None:
    """Each replica drains, as `mace serve` does on SIGTERM, and checkpoints its trainer; bounded, since
    a Ray whose own processes were signalled too (a process group's Ctrl-C) never answers."""
    from ray import serve

    from mace.cluster.app import APP_NAME, STOP_MARGIN_S

    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,), kwargs={"_blocking": True}, daemon=True)
    deleting.start()
    deleting.join(config.server.drain_timeout_s + STOP_MARGIN_S)
    if deleting.is_alive():
        log.warning("the replicas did not stop in time; Ray stops under them (their journals are safe, "
                    "learner steps since the last checkpoint are not)")


def _deploy(config: MaceConfig, replicas: int, local: bool, log_level: str) -> Any:
    import ray
    from ray import serve

    from mace.cluster.app import APP_NAME, replicas_app

    log.info("starting replicas", replicas=replicas, ray=ray.get_runtime_context().gcs_address)
    # On a local cluster the replicas listen on loopback; joined to a cluster, on their node's address.
    app = replicas_app(config, replicas, "127.0.0.1" if local else "", log_level)
    return serve.run(app, name=APP_NAME, route_prefix=None)


async def _serve_front(config: MaceConfig, handle: Any, replicas: int) -> None:
    from mace.cluster import registry
    from mace.cluster.front import create_front

    async def registered() -> list[dict[str, Any]]:
        return await asyncio.to_thread(registry.registered, config.data_dir)

    app = create_front(config, handle, registered, replicas)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
        log.info("cluster front end listening", host=config.server.host, port=config.server.port, replicas=replicas)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        await stop.wait()
        log.info("signal received; stopping the replicas")
    finally:
        await runner.cleanup()
