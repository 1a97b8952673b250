"""The CLI: `python -m loadgen run|compare|trace ...` (see --help of each)."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

from loadgen import traces
from loadgen.compare import POLICIES, ServerSpec, compare
from loadgen.metrics import parse_slo, summarize
from loadgen.plots import PlotRun, phase_starts_of, write_plots
from loadgen.progress import Progress
from loadgen.report import write_records, write_summary
from loadgen.runner import RunConfig, Runner


def _weights(text: str) -> dict[str, float]:
    """`chat=3,ws=1` -> {"chat": 3.0, "ws": 1.0}; a bare kind weighs 1."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        mix[kind.strip()] = float(weight) if weight else 1.0
    return mix


def _wait(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def _add_trace_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trace (built-in traces are generated from these and the seed)")
    group.add_argument("--trace", default="personalization",
                       help="personalization, moderation, tenants (one tenant per user) or a JSONL path")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--phases", type=int, default=3)
    group.add_argument("--phase-seconds", type=float, default=60.0)
    group.add_argument("--trace-rate", type=float, default=2.0, help="requests per second in the trace's clock")
    group.add_argument("--trace-feedback", type=float, default=0.5, help="fraction of items carrying feedback")
    group.add_argument("--max-tokens", type=int, default=8)
    group.add_argument("--tenants", type=int, default=16, help="tenants trace: tenants, each with its own 4 facts")
    group.add_argument("--user-tenants", action="store_true",
                       help="personalization trace: each user is its own tenant (OpenAI's `user` on its requests)")
    group.add_argument("--chatters", type=int, default=8,
                       help="tenants trace: users who only chat (no `user` field, no feedback)")


def _add_run_args(parser: argparse.ArgumentParser, arrival: str) -> None:
    _add_trace_args(parser)
    group = parser.add_argument_group("load")
    group.add_argument("--arrival", choices=["closed", "poisson", "bursty", "replay"], default=arrival)
    group.add_argument("--users", type=int, default=4, help="closed loop: concurrent users")
    group.add_argument("--spawn-rate", type=float, default=10.0, help="closed loop: users started per second")
    group.add_argument("--wait", type=_wait, default=None, help="closed loop: think time LOW[,HIGH] seconds")
    group.add_argument("--rate", type=float, default=2.0, help="poisson/bursty: requests per second")
    group.add_argument("--burstiness", type=float, default=4.0, help="bursty: CV² of the gaps (1 = Poisson)")
    group.add_argument("--time-scale", type=float, default=1.0, help="replay: multiply the trace's times")
    group.add_argument("--duration", type=float, default=None, help="seconds; stops issuing requests after")
    group.add_argument("--requests", type=int, default=None, help="how many requests (default: one pass)")
    group.add_argument("--mix", type=_weights, default={"feedback": 1.0},
                       help="user kinds and weights: chat, completion, ws, feedback (default feedback=1)")
    group.add_argument("--feedback-fraction", type=float, default=1.0,
                       help="feedback users: fraction of feedback-carrying requests they correct")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a request fails")
    group.add_argument("--slo", type=parse_slo, default={}, help="e.g. ttft=1.0,tpot=0.15 (seconds)")
    group.add_argument("--out", type=Path, required=True, help="directory for the results")
    group.add_argument("--no-progress", action="store_true", help="no live view in the terminal")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="drive a running server")
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    run.add_argument("--api-key", default=None)
    _add_run_args(run, "closed")
    cmp = commands.add_parser("compare", help="one server per retraining policy on the same trace")
    cmp.add_argument("--policies", default=",".join(POLICIES))
    cmp.add_argument("--model", default="builtin:smollm2")
    cmp.add_argument("--config", default="configs/default.toml")
    _add_run_args(cmp, "replay")
    trace = commands.add_parser("trace", help="write a built-in trace as JSONL")
    _add_trace_args(trace)
    trace.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    return root


def load_items(args: argparse.Namespace) -> list[traces.TraceItem]:
    spec = traces.DriftSpec(seed=args.seed, phases=args.phases, phase_s=args.phase_seconds, rate=args.trace_rate,
                            feedback_fraction=args.trace_feedback, max_tokens=args.max_tokens,
                            tenants=args.tenants, chatters=args.chatters, user_tenants=args.user_tenants)
    return traces.load(args.trace, spec)


def run_config(args: argparse.Namespace, items: list[traces.TraceItem], url: str) -> RunConfig:
    requests = args.requests
    if requests is None and args.duration is None and args.arrival != "replay":
        requests = len(items)  # one pass through the trace
    return RunConfig(
        url=url, arrival=args.arrival, users=args.users, spawn_rate=args.spawn_rate, wait=args.wait, rate=args.rate,
        burstiness=args.burstiness, time_scale=args.time_scale, duration_s=args.duration, requests=requests,
        seed=args.seed, mix=args.mix, feedback_fraction=args.feedback_fraction, temperature=args.temperature,
        timeout_s=args.timeout, model=getattr(args, "model", None), api_key=getattr(args, "api_key", None),
    )


async def run_command(args: argparse.Namespace) -> dict[str, Any]:
    items = load_items(args)
    config = run_config(args, items, args.url)
    with Progress(not args.no_progress) as live:
        result = await Runner(config, items, on_tick=live.update).run()
    summary = summarize(result.records, args.slo, result.duration_s, result.events)
    write_records(args.out, result.records, result.events)
    write_summary(args.out, summary, f"loadgen run against {args.url} (trace {args.trace}, seed {args.seed})")
    write_plots(args.out, {"run": PlotRun(result.records, result.events)}, phase_starts_of(result.records))
    return summary


async def compare_command(args: argparse.Namespace) -> dict[str, Any]:
    items = load_items(args)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "command.txt").write_text("python -m loadgen " + shlex.join(args.argv) + "\n")
    config = run_config(args, items, url="")
    spec = ServerSpec(model=args.model, config=args.config)
    return await compare(policies, items, spec, config, args.out, args.slo, not args.no_progress, args.trace)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # compare records the exact command
    if args.command == "trace":
        traces.write(args.out, load_items(args))
        print(f"wrote {args.out}")
        return 0
    if args.command == "run":
        summary = asyncio.run(run_command(args))
        print((args.out / "summary.md").read_text())
        return 0 if summary["ok"] else 1
    result = asyncio.run(compare_command(args))
    print((args.out / "compare.md").read_text())
    return 0 if result["summaries"] else 1


if __name__ == "__main__":
    sys.exit(main())
