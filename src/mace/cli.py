"""The `mace` command: `mace serve [--config PATH] [--model M] [--dtype ...] [--device ...] [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import structlog
import uvloop
from aiohttp import web

from mace.config import ConfigError, MaceConfig, load_config
from mace.logging import configure_logging
from mace.server.app import create_app

log = structlog.get_logger("mace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace", description="An LLM server that learns while it serves.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--config", help="TOML config file (configs/default.toml)")
    serve.add_argument("--model", help="builtin:smollm2, builtin:tiny, or a local Hugging Face checkpoint dir")
    serve.add_argument("--dtype", choices=["float32", "bfloat16"])
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"model": {}, "server": {}}
    for flag, section, key in (("model", "model", "name"), ("dtype", "model", "dtype"),
                               ("device", "model", "device"), ("host", "server", "host"),
                               ("port", "server", "port")):
        value = getattr(args, flag)
        if value is not None:
            overrides[section][key] = value
    return overrides


def serve(config: MaceConfig) -> None:
    app = create_app(config)
    log.info("starting", host=config.server.host, port=config.server.port, model=config.model.name)
    # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
    web.run_app(app, host=config.server.host, port=config.server.port, handler_cancellation=True,
                print=None, access_log=None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, _flag_overrides(args))
    except ConfigError as exc:
        print(f"mace: {exc}", file=sys.stderr)
        return 2
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
