"""PNG plots of one or several runs (matplotlib, optional: without it no plot is written).

latency_cdf.png: CDFs of TTFT, TPOT and E2E. latency_over_time.png: TTFT and TPOT of each request
against its start. alignment_over_time.png: exact-match rate over a sliding window of requests, with
the trace's phase boundaries (dashed) and each run's adapter publish events of the shared lineage
(ticks at the top).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.metrics import GENERATION_KINDS, RequestRecord, exact_match


@dataclass
class PlotRun:
    records: Sequence[RequestRecord]
    events: Sequence[Mapping[str, Any]] = field(default_factory=list)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(out: Path, runs: Mapping[str, PlotRun], phase_starts: Mapping[int, float],
                window: int = 20) -> list[Path]:
    """Write the three PNGs into `out`; returns their paths ([] without matplotlib)."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in CI and threads
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("latency_cdf.png", _cdf), ("latency_over_time.png", _over_time),
                       ("alignment_over_time.png", _alignment)):
        figure = draw(plt, runs, phase_starts, window)
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(out / name)
    return paths


def _ok(run: PlotRun) -> list[RequestRecord]:
    return [r for r in run.records if r.ok and r.kind in GENERATION_KINDS]


def _cdf(plt: Any, runs: Mapping[str, PlotRun], phase_starts: Mapping[int, float], window: int) -> Any:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (label, attr) in zip(axes, (("TTFT (s)", "ttft_s"), ("TPOT (s)", "tpot_s"), ("E2E (s)", "e2e_s")),
                                   strict=True):
        for name, run in runs.items():
            values = sorted(v for r in _ok(run) if (v := getattr(r, attr)) is not None)
            if values:
                axis.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        axis.set_xlabel(label)
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
    axes[0].legend()
    return figure


def _over_time(plt: Any, runs: Mapping[str, PlotRun], phase_starts: Mapping[int, float], window: int) -> Any:
    figure, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for name, run in runs.items():
        records = sorted(_ok(run), key=lambda r: r.start_s)
        axes[0].plot([r.start_s for r in records if r.ttft_s is not None],
                     [r.ttft_s for r in records if r.ttft_s is not None], ".", ms=3, label=name)
        with_tpot = [r for r in records if r.tpot_s is not None]
        axes[1].plot([r.start_s for r in with_tpot], [r.tpot_s for r in with_tpot], ".", ms=3, label=name)
    axes[0].set_ylabel("TTFT (s)")
    axes[1].set_ylabel("TPOT (s)")
    axes[1].set_xlabel("time since start (s)")
    for axis in axes:
        _phases(axis, phase_starts)
        axis.grid(alpha=0.3)
    axes[0].legend()
    return figure


def rolling_exact(records: Sequence[RequestRecord], window: int) -> tuple[list[float], list[float]]:
    """(times, rates): the exact-match rate of the last `window` answered questions at each answer."""
    scored = sorted((r for r in records if r.ok and r.reference is not None and r.kind in GENERATION_KINDS),
                    key=lambda r: r.end_s or r.start_s)
    hits = [1.0 if exact_match(r.answer, r.reference or "") else 0.0 for r in scored]
    times, rates = [], []
    for index, record in enumerate(scored):
        recent = hits[max(0, index + 1 - window): index + 1]
        times.append(record.end_s or record.start_s)
        rates.append(sum(recent) / len(recent))
    return times, rates


def _alignment(plt: Any, runs: Mapping[str, PlotRun], phase_starts: Mapping[int, float], window: int) -> Any:
    figure, axis = plt.subplots(figsize=(12, 4.5))
    for name, run in runs.items():
        times, rates = rolling_exact(run.records, window)
        (line,) = axis.plot(times, rates, label=name)
        publishes = [e["time_s"] for e in run.events
                     if e.get("kind") == "adapter" and not e.get("initial") and e.get("tenant") is None]
        axis.plot(publishes, [1.02] * len(publishes), "|", color=line.get_color(), ms=12)
    _phases(axis, phase_starts)
    axis.set_ylim(-0.02, 1.06)
    axis.set_xlabel("time since start (s)")
    axis.set_ylabel(f"exact match (last {window})")
    axis.set_title("alignment over time (dashed: phase boundaries; ticks: adapter publishes)")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def _phases(axis: Any, phase_starts: Mapping[int, float]) -> None:
    for phase, start in phase_starts.items():
        if phase > 0:
            axis.axvline(start, color="grey", linestyle="--", linewidth=1)


def phase_starts_of(records: Sequence[RequestRecord]) -> dict[int, float]:
    """Where each phase began in run time: its first arrival (closed-loop runs follow the trace's
    order, not its clock, so the trace's own times would not line up)."""
    starts: dict[int, float] = {}
    for record in records:
        if record.phase is not None and record.kind in GENERATION_KINDS:
            starts[record.phase] = min(starts.get(record.phase, record.arrival_s), record.arrival_s)
    return dict(sorted(starts.items()))
