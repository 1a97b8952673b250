"""The `mace` command: `mace serve [--config PATH] [--model M] [--dtype ...] [--device ...] [--host H] [--port P]
[--replicas N]`.

SIGTERM or SIGINT stops admission (new API requests get 503), lets running streams finish for up to
`server.drain_timeout_s`, then stops the engine, which checkpoints the trainer, and exits 0. A second
signal cuts the drain short.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import structlog
import uvloop
from aiohttp import web

from mace.config import ConfigError, MaceConfig, load_config
from mace.logging import configure_logging
from mace.server.app import create_app
from mace.server.auth import check_bind, is_loopback
from mace.server.keys import RUNTIME

log = structlog.get_logger("mace")


def _parser() -> argparse.ArgumentParser:
    defaults = MaceConfig()
    parser = argparse.ArgumentParser(prog="mace", description="An LLM server that learns while it serves.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible API",
        description="Serve the OpenAI-compatible API and learn from feedback. With no flags this is the product "
                    "as shipped: every default lives in src/mace/config.py and is written out in "
                    "configs/default.toml; a config file, MACE_<SECTION>__<KEY> variables and flags override them, "
                    "in that order.",
    )
    serve.add_argument("--config", help="TOML file of overrides (default: none, the built-in defaults)")
    serve.add_argument("--model", help="builtin:smollm2, builtin:tiny, or a local Hugging Face checkpoint dir "
                                       f"(default: {defaults.model.name})")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help=f"(default: {defaults.model.dtype})")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"(default: {defaults.model.device})")
    serve.add_argument("--host", help=f"(default: {defaults.server.host})")
    serve.add_argument("--port", type=int, help=f"(default: {defaults.server.port})")
    serve.add_argument("--allow-unauthenticated", action="store_true", default=None,
                       help="serve a non-loopback host without API keys (anyone who reaches it is admin)")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="run N replicas under Ray Serve behind this port (joins $RAY_ADDRESS, else starts a "
                            "local Ray); they share data_dir. Default: one process, no Ray")
    serve.add_argument("--attach", action="store_true",
                       help="with --replicas: serve the front end of the `mace` Serve app already deployed on "
                            "$RAY_ADDRESS (a RayService, deploy/) instead of deploying one")
    serve.add_argument("--log-level", default=os.environ.get("MACE_LOG_LEVEL", "info").lower(),
                       choices=["debug", "info", "warning", "error"],
                       help="debug adds a line per engine step (default: $MACE_LOG_LEVEL or info)")
    return parser


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"model": {}, "server": {}}
    for flag, section, key in (("model", "model", "name"), ("dtype", "model", "dtype"),
                               ("device", "model", "device"), ("host", "server", "host"),
                               ("port", "server", "port"),
                               ("allow_unauthenticated", "server", "allow_unauthenticated")):
        value = getattr(args, flag)
        if value is not None:
            overrides[section][key] = value
    return overrides


def serve(config: MaceConfig) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config))


async def _serve(config: MaceConfig) -> None:
    app = create_app(config)
    # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
    # shutdown_timeout: the drain already gave running requests their `drain_timeout_s`; at cleanup
    # what still runs gets a moment to flush, then its handler is cancelled (its request aborted).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
        _log_start(config)
        signals = await _wait_for_signal()
        draining = asyncio.create_task(app[RUNTIME].drain(config.server.drain_timeout_s))
        await asyncio.wait([draining, asyncio.create_task(signals.get())], return_when=asyncio.FIRST_COMPLETED)
        draining.cancel()
    finally:
        await runner.cleanup()  # stops the engine; its shutdown checkpoints the trainer
    log.info("stopped")


async def _wait_for_signal() -> asyncio.Queue[signal.Signals]:
    """Waits for the first SIGTERM/SIGINT; the queue then receives any later one."""
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, received.put_nowait, number)
    first = await received.get()
    log.info("signal received; shutting down", signal=first.name)
    return received


def _log_start(config: MaceConfig) -> None:
    server = config.server
    log.info("starting", host=server.host, port=server.port, model=config.model.name,
             auth="api keys" if server.api_keys else "none", num_api_keys=len(server.api_keys),
             train_policy=config.train.policy, tpot_s=config.slo.tpot_s)
    if config.train.policy == "none":
        log.warning("training is off (train.policy = none): feedback is journaled but nothing learns from it")
    if server.api_keys:
        return
    if is_loopback(server.host):
        log.warning(f"no API keys configured: the API is open, so it listens on loopback only ({server.host}); "
                    "set MACE_SERVER__API_KEYS to serve other hosts")
    else:
        log.warning(f"no API keys configured and allow_unauthenticated is set: anyone who reaches {server.host} "
                    "may generate, train and activate adapters")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, _flag_overrides(args))
    except ConfigError as exc:
        print(f"mace: {exc}", file=sys.stderr)
        return 2
    refusal = check_bind(config.server)
    if refusal is not None:
        print(f"mace: {refusal}", file=sys.stderr)
        return 2
    if args.replicas is not None:
        return _serve_replicas(config, args.replicas, args.log_level, args.attach)
    if args.attach:
        print("mace: --attach serves the front end of replicas: give --replicas N", file=sys.stderr)
        return 2
    serve(config)
    return 0


def _serve_replicas(config: MaceConfig, replicas: int, log_level: str, attach: bool) -> int:
    if replicas < 1:
        print("mace: --replicas must be at least 1", file=sys.stderr)
        return 2
    from mace.cluster.launch import ClusterUnavailable, serve_cluster  # Ray is imported only here

    try:
        serve_cluster(config, replicas, log_level, attach)
    except ClusterUnavailable as exc:
        print(f"mace: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
