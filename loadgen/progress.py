"""Live progress in the terminal (rich): elapsed, done/failed, recent TTFT/TPOT p50/p99, adapter version."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadgen.context import RunContext
from loadgen.metrics import percentile


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def render(ctx: RunContext, title: str = "loadgen") -> Table:
    """One table of the run's state; percentiles are over the last requests (a sliding window), so
    they follow the server as it changes rather than averaging the whole run."""
    recorder = ctx.recorder
    done, failed = recorder.counts()
    ttft, tpot = list(recorder.recent_ttft), list(recorder.recent_tpot)
    feedback = [r for r in recorder.records if r.kind == "feedback"]
    table = Table(title=title, show_header=False, min_width=48)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("elapsed", f"{ctx.now():.1f} s")
    table.add_row("done / failed", f"{done} / {failed}")
    table.add_row("TTFT p50 / p99", f"{_ms(percentile(ttft, 50))} / {_ms(percentile(ttft, 99))}")
    table.add_row("TPOT p50 / p99", f"{_ms(percentile(tpot, 50))} / {_ms(percentile(tpot, 99))}")
    table.add_row("feedback ok / sent", f"{sum(r.ok for r in feedback)} / {len(feedback)}")
    version = recorder.adapter_version
    table.add_row("adapter version", "-" if version is None else str(version))
    if recorder.tenant_versions:
        published = sum(e.get("tenant") is not None and not e.get("initial") for e in recorder.events)
        table.add_row("tenant publishes", f"{published} ({len(recorder.tenant_versions)} tenants seen)")
    return table


class Progress:
    """`with Progress() as progress: Runner(..., on_tick=progress.update)`; a no-op when disabled."""

    def __init__(self, enabled: bool = True, title: str = "loadgen", console: Console | None = None) -> None:
        self.title = title
        self._live = Live(console=console or Console(stderr=True), refresh_per_second=4) if enabled else None

    def update(self, ctx: RunContext) -> None:
        if self._live is not None:
            self._live.update(render(ctx, self.title))

    def __enter__(self) -> Self:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
