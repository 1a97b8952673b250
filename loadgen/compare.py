"""`compare`: one mace server per retraining policy, each driven by the same trace and seed, then one
side-by-side table and the plots. Policies run one after another (never concurrently) so that
they do not compete for the machine, and each gets a fresh data dir so that none inherits another's
feedback or adapters."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loadgen.metrics import RequestRecord, exact_match, summarize, tenant_alignment
from loadgen.plots import PlotRun, phase_starts_of, write_plots
from loadgen.progress import Progress
from loadgen.report import comparison_table, write_records, write_summary
from loadgen.runner import RunConfig, Runner
from loadgen.tenants import Taught, others_taught, taught_by_all
from loadgen.traces import TraceItem, question_key
from mace.client import AsyncClient, MaceError

POLICIES = ("none", "periodic", "continuous", "mace")


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log's tail."""


@dataclass
class ServerSpec:
    model: str
    config: str = "configs/default.toml"
    ready_timeout_s: float = 600.0  # the first start may convert a checkpoint
    extra_env: dict[str, str] | None = None
    # Replaces `mace serve ...` (tests start a fake); "{port}" in it is replaced by the port.
    command: tuple[str, ...] | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PolicyServer:
    """`mace serve` in a child process with MACE_TRAIN__POLICY set; its output goes to a log file."""

    def __init__(self, spec: ServerSpec, policy: str, workdir: Path) -> None:
        self.spec, self.policy = spec, policy
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.data_dir = workdir / "data"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, **(self.spec.extra_env or {}), "MACE_TRAIN__POLICY": self.policy,
               "MACE_DATA_DIR": str(self.data_dir)}
        command = [sys.executable, "-m", "mace.cli", "serve", "--config", self.spec.config,
                   "--model", self.spec.model, "--port", str(self.port), "--host", "127.0.0.1"]
        if self.spec.command is not None:
            command = [part.replace("{port}", str(self.port)) for part in self.spec.command]
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a rerun must not inherit the last run's journal
        self.data_dir.mkdir(parents=True)
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.spec.ready_timeout_s
        async with AsyncClient(self.url, timeout_s=5.0) as client:
            while not await client.ready():
                if self._process.returncode is not None:
                    raise ServerFailed(f"policy {self.policy}: the server exited with {self._process.returncode}:\n"
                                       + self.log_tail())
                if time.monotonic() > deadline:
                    raise ServerFailed(f"policy {self.policy}: not ready after {self.spec.ready_timeout_s:.0f}s:\n"
                                       + self.log_tail())
                await asyncio.sleep(0.5)

    async def training_figures(self) -> dict[str, float]:
        """The server's training counters from /metrics (empty when it exposes none)."""
        try:
            async with AsyncClient(self.url, timeout_s=10.0) as client:
                text = await client.metrics()
        except MaceError:
            return {}
        wanted = {"mace:train_tokens_total": "train_tokens", "mace:train_optimizer_steps_total": "optimizer_steps",
                  "mace:heldout_loss_serving": "heldout_loss_serving",
                  "mace:heldout_loss_learner": "heldout_loss_learner"}
        figures: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    figures[wanted[sample.name]] = sample.value
        return figures

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30.0)
        except TimeoutError:
            process.kill()
            await process.wait()


PROBE_CONCURRENCY = 4


async def final_alignment(url: str, items: list[TraceItem]) -> dict[str, Any]:
    """Every distinct question of the trace's last phase, asked once more after the trace (greedy, a
    few at a time, nothing else running): each policy's final served version scored on the same
    questions. During the trace a policy that fails requests is scored only on those it answered,
    and the questions come at different moments of its training, so per-phase figures compare less
    fairly than this one. In a multi-tenant trace a question is distinct per tenant and is asked as
    that tenant (`user`); "tenants" then holds the per-tenant exact match and the leaks
    (`metrics.tenant_alignment`)."""
    with_reference = [item for item in items if item.reference is not None]
    if not with_reference:
        return {}
    last = max(item.phase for item in with_reference)
    questions: dict[tuple[str, str], TraceItem] = {}
    for item in with_reference:
        if item.phase == last:
            questions.setdefault((item.tenant or "", question_key(item.messages)), item)
    gate = asyncio.Semaphore(PROBE_CONCURRENCY)
    taught = taught_by_all(items)  # after the trace, whatever any tenant taught could have leaked

    async def ask(client: AsyncClient, item: TraceItem) -> RequestRecord:
        others = (None if item.other_answers is None or item.tenant is None
                  else others_taught(taught, item.messages, item.tenant))
        record = RequestRecord(request_id="", kind="chat", user="final", phase=item.phase, reference=item.reference,
                               trace_id=item.id, tenant=item.tenant, other_answers=others)
        async with gate:
            try:
                params: dict[str, Any] = {"max_tokens": item.max_tokens, "temperature": 0.0}
                if item.tenant is not None:
                    params["user"] = item.tenant
                async with client.chat(item.messages, stream=True, **params) as stream:
                    async for _ in stream:
                        pass
                    record.answer, record.adapter_version = stream.result.text, stream.result.adapter_version
            except Exception as exc:
                record.status = "exception"
                record.error = f"{type(exc).__name__}: {exc}"[:500]
        return record

    async with AsyncClient(url, timeout_s=120.0) as client:
        records = await asyncio.gather(*(ask(client, item) for item in questions.values()))
    answered = [record for record in records if record.ok]
    final: dict[str, Any] = {
        "phase": float(last), "n": float(len(questions)), "answered": float(len(answered)),
        "exact": (sum(exact_match(r.answer, r.reference or "") for r in answered) / len(answered)
                  if answered else math.nan),
    }
    if (tenants := tenant_alignment(records)) is not None:
        add_taught(tenants, questions.values(), taught)
        final["tenants"] = tenants
    return final


def add_taught(tenants: dict[str, Any], asked: Iterable[TraceItem], taught: Taught) -> None:
    """Each tenant's share of the probe's questions whose answer it taught in the trace (`taught`): what
    a server that learned every taught sample could answer at best ("taught" per tenant, and their mean
    and lowest)."""
    shares: dict[str, list[bool]] = {}
    for item in asked:
        if item.tenant is not None:
            values = taught.get(question_key(item.messages), {}).get(item.tenant, set())
            shares.setdefault(item.tenant, []).append(item.reference in values)
    for tenant, stats in tenants["per_tenant"].items():
        taught_or_not = shares.get(tenant, [])
        stats["taught"] = sum(taught_or_not) / max(1, len(taught_or_not))
    values = [stats["taught"] for stats in tenants["per_tenant"].values()]
    tenants["mean_taught"], tenants["min_taught"] = sum(values) / len(values), min(values)


async def compare(policies: list[str], items: list[TraceItem], spec: ServerSpec, run: RunConfig, out: Path,
                  slo: dict[str, float], progress: bool = True, trace_name: str = "") -> dict[str, Any]:
    """Run every policy; write out/<policy>/ (records, summary, server.log) and out/compare.md and
    the plots. A policy whose server fails is reported in the table's notes, not fatal to the rest."""
    summaries: dict[str, dict[str, Any]] = {}
    plot_runs: dict[str, PlotRun] = {}
    notes: list[str] = []
    for policy in policies:
        workdir = out / policy
        workdir.mkdir(parents=True, exist_ok=True)
        server = PolicyServer(spec, policy, workdir)
        try:
            await server.start()
            with Progress(progress, title=f"loadgen compare: {policy}") as live:
                result = await Runner(replace(run, url=server.url), items, on_tick=live.update).run()
            training = await server.training_figures()
            final = await final_alignment(server.url, items)
        except ServerFailed as exc:
            notes.append(f"- {policy}: {str(exc).splitlines()[0]} (see {workdir / 'server.log'})")
            continue
        finally:
            await server.stop()
        summary = summarize(result.records, slo, result.duration_s, result.events)
        if "train_tokens" in training:
            summary["training"] = {**training, "tokens_per_s": training["train_tokens"] / result.duration_s}
        if final:
            summary["final_alignment"] = final
        write_records(workdir, result.records, result.events)
        write_summary(workdir, summary, f"policy {policy}")
        summaries[policy] = summary
        plot_runs[policy] = PlotRun(result.records, result.events)
    lines = [f"# Policy comparison: trace {trace_name or '?'}, model {spec.model}, seed {run.seed}", ""]
    if summaries:
        lines.append(comparison_table(summaries))
    if notes:
        lines += ["", "Policies that did not run:", *notes]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if plot_runs:
        first = next(iter(plot_runs.values()))
        write_plots(out, plot_runs, phase_starts_of(first.records))
    return {"summaries": summaries, "notes": notes}
