"""Output files: per-request JSONL and CSV, events JSONL, summary JSON and Markdown, and the
side-by-side Markdown table of several runs."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from loadgen.metrics import RequestRecord

CSV_FIELDS = (
    "request_id", "trace_id", "kind", "user", "tenant", "phase", "status", "arrival_s", "start_s", "ttft_s", "tpot_s",
    "e2e_s", "prompt_tokens", "output_tokens", "adapter_version", "finish_reason", "reference", "answer",
    "error", "itl_s",
)


def write_records(out: Path, records: Sequence[RequestRecord], events: Sequence[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: (r.start_s, r.request_id))
    with (out / "requests.jsonl").open("wb") as jsonl:
        for record in ordered:
            jsonl.write(orjson.dumps(record.to_dict()) + b"\n")
    with (out / "requests.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in ordered:
            row = record.to_dict()
            # One cell per request: the gaps joined, so the CSV stays one row per request.
            row["itl_s"] = ";".join(f"{gap:.6f}" for gap in record.itl_s)
            writer.writerow(row)
    with (out / "events.jsonl").open("wb") as handle:
        for event in events:
            handle.write(orjson.dumps(event) + b"\n")


def read_records(path: Path) -> list[RequestRecord]:
    return [RequestRecord.from_dict(orjson.loads(line)) for line in path.read_bytes().splitlines() if line.strip()]


def write_summary(out: Path, summary: Mapping[str, Any], title: str = "loadgen run") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    (out / "summary.md").write_text(f"# {title}\n\n" + comparison_table({"run": summary}) + "\n")


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _per_s(seconds: Any) -> str:
    return "-" if not seconds or (isinstance(seconds, float) and math.isnan(seconds)) else f"{1 / seconds:.1f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The table rows of one summary, in the order a reader wants them."""
    out = [
        ("requests (ok / failed)", f"{summary['ok']} / {summary['failed']}"),
        ("duration (s)", _num(summary["duration_s"], 1)),
        ("throughput (req/s)", _num(summary["throughput_rps"])),
        ("output tokens/s", _num(summary["output_tok_s"], 1)),
    ]
    for metric, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        stats = summary[metric]
        out.append((f"{label} p50 / p90 / p99 (ms)", " / ".join(_ms(stats[f"p{p}"]) for p in (50, 90, 99))))
    # What one chat user sees: the none policy's column is the same traffic with training off.
    out.append(("tokens/s of one stream, p50 / p10 (1 / TPOT p50 / p90)",
                " / ".join(_per_s(summary["tpot_s"][f"p{p}"]) for p in (50, 90))))
    slo = summary.get("slo") or {}
    if slo:
        limits = ", ".join(f"{k}≤{v:g}s" for k, v in slo.items())
        out.append((f"goodput (req/s, {limits})", _num(summary["goodput_rps"])))
        out.append(("SLO attainment", _pct(summary["slo_attainment"].get("all"))))
        for key in slo:
            out.append((f"{key.upper()} SLO attainment", _pct(summary["slo_attainment"].get(key))))
    feedback = summary["feedback"]
    out.append(("feedback (ok / sent)", f"{feedback['ok']} / {feedback['sent']}"))
    versions = summary.get("adapter_versions") or []
    out.append(("adapter versions in answers", ", ".join(map(str, versions)) or "-"))
    publishes = summary.get("adapter_publishes") or []
    out.append(("shared lineage's adapter publishes (first at s)",
                f"{len(publishes)} ({publishes[0]['time_s']:.1f})" if publishes else "0"))
    training = summary.get("training")
    if training:
        out.append(("training tokens/s (optimizer steps)",
                    f"{_num(training['tokens_per_s'], 1)} ({int(training.get('optimizer_steps', 0))})"))
        if training.get("optimizer_steps"):  # a server that never trained has no held-out losses
            out.append(("held-out loss at the end (serving / learner)",
                        f"{_num(training.get('heldout_loss_serving', math.nan))} / "
                        f"{_num(training.get('heldout_loss_learner', math.nan))}"))
    for phase, stats in summary["alignment"].items():
        out.append((f"alignment phase {phase} (exact / prefix, n)",
                    f"{_pct(stats['exact'])} / {_pct(stats['prefix'])}, {int(stats['n'])}"))
    final = summary.get("final_alignment")
    if final:
        exact = final["exact"] if final["answered"] else None
        out.append(("alignment after the trace: last phase's questions again (exact, answered / asked)",
                    f"{_pct(exact)}, {int(final['answered'])} / {int(final['n'])}"))
    out += tenant_rows(summary.get("tenants"), (final or {}).get("tenants"))
    return out


def tenant_rows(during: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The rows of a multi-tenant trace: exact match per tenant (the mean over tenants and the lowest),
    cross-tenant leaks, each tenant's own row, during the trace and when asked again after it."""
    out: list[tuple[str, str]] = []
    for label, stats in (("during the trace", during), ("after the trace", after)):
        if stats:
            out.append((f"tenants {label}: exact match mean / lowest (tenant)",
                        f"{_pct(stats['mean_exact'])} / {_pct(stats['min_exact'])} ({stats['min_tenant']})"))
            out.append((f"tenants {label}: cross-tenant leaks (answers / scored)",
                        f"{stats['leaks']} / {stats['scored']}"))
            if "mean_taught" in stats:
                out.append((f"tenants {label}: questions taught in the trace, mean / lowest (the most they can answer)",
                            f"{_pct(stats['mean_taught'])} / {_pct(stats['min_taught'])}"))
    if during:
        per_tenant = during["per_tenant"].values()
        out.append(("tenant adapter publishes seen (tenants / publishes)",
                    f"{sum(s['publishes'] > 0 for s in per_tenant)} / {sum(s['publishes'] for s in per_tenant)}"))
    tenants = sorted({*(during or {}).get("per_tenant", {}), *(after or {}).get("per_tenant", {})})
    for tenant in tenants:
        now = (during or {}).get("per_tenant", {}).get(tenant)
        later = (after or {}).get("per_tenant", {}).get(tenant)
        value = ("-" if now is None else f"{_pct(now['exact'])} ({int(now['n'])})") + " / " + (
            "-" if later is None else _pct(later["exact"]))
        if later is not None and "taught" in later:
            value += f" of {_pct(later['taught'])} taught"
        leaks = [(stats or {}).get("leaks", 0) for stats in (now, later)]
        if any(leaks):
            value += f", leaks {leaks[0]} / {leaks[1]}"
        out.append((f"tenant {tenant}: exact during the trace (n) / after", value))
    return out


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table: a row per metric, a column per run. Runs missing a row show "-"."""
    columns = list(summaries)
    table: dict[str, dict[str, str]] = {}
    for name, summary in summaries.items():
        for label, value in rows(summary):
            table.setdefault(label, {})[name] = value
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, values in table.items():
        lines.append(f"| {label} | " + " | ".join(values.get(name, "-") for name in columns) + " |")
    return "\n".join(lines)
