"""Per-request records and the run summary: latency percentiles, throughput, goodput under SLOs,
SLO attainment, alignment (exact match against reference answers) per phase and, for multi-tenant
traces, per tenant, with cross-tenant leaks."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GENERATION_KINDS = ("chat", "completion", "ws")
PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; `arrival_s`/`start_s` are relative to
    the run's start; the latencies are measured from `start_s`. TTFT runs until the first non-empty
    text delta (the SDK yields no empty ones), and `itl_s` holds the gaps between text deltas, each
    usually one token. `status` is "ok" or why it failed ("error_event", "http_<code>", "timeout",
    "connection", "exception", "cancelled")."""

    request_id: str
    kind: str  # chat | completion | ws | feedback
    user: str = ""
    phase: int | None = None
    arrival_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    status: str = "ok"
    error: str | None = None
    adapter_version: int | None = None
    finish_reason: str | None = None
    answer: str | None = None
    reference: str | None = None
    trace_id: str | None = None
    tenant: str | None = None  # the trace item's tenant, sent as `user`
    other_answers: list[str] | None = None  # other tenants' answers to the same question


    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (output tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot_s"] = self.tpot_s
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in names})


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=1.0,tpot=0.15[,e2e=10]` -> {"ttft": 1.0, "tpot": 0.15}; values are seconds."""
    slo: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {part!r}: expected KEY=SECONDS with KEY one of {', '.join(SLO_KEYS)}")
        seconds = float(value)
        if not seconds > 0:
            raise ValueError(f"bad SLO {part!r}: the limit must be positive")
        slo[key] = seconds
    return slo


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    stats: dict[str, float | None] = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    stats["mean"] = sum(values) / len(values) if values else None
    stats["count"] = float(len(values))
    return stats


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """An ok request whose measured latencies are within every SLO. A missing TPOT (one output token)
    cannot violate the TPOT SLO; a missing TTFT (no token at all) violates the TTFT SLO."""
    if not record.ok:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}
    for key, limit in slo.items():
        value = measured[key]
        if value is None and key == "tpot":
            continue
        if value is None or value > limit:
            return False
    return True


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "  Blue. " -> "blue"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(answer: str | None, reference: str) -> bool:
    return answer is not None and normalize(answer) == normalize(reference)


def prefix_match(answer: str | None, reference: str) -> bool:
    """The answer starts with the reference as whole words ("Blue, of course" matches "blue")."""
    if answer is None:
        return False
    words, ref = normalize(answer).split(), normalize(reference).split()
    return bool(ref) and words[: len(ref)] == ref


def contains(answer: str | None, value: str) -> bool:
    """The answer names `value` as whole words, anywhere ("I think Luna." names "luna", "Lunar" does not)."""
    words = normalize(value)
    return answer is not None and bool(words) and f" {words} " in f" {normalize(answer)} "


def leaked(record: RequestRecord) -> list[str]:
    """The other tenants' answers that this answer names while it does not name the asker's own
    (the reference): a cross-tenant leak when not empty."""
    if not record.ok or record.tenant is None or not record.other_answers or record.reference is None:
        return []
    if contains(record.answer, record.reference):
        return []
    return [value for value in record.other_answers if contains(record.answer, value)]


LEAK_EXAMPLES = 5


def tenant_alignment(records: Iterable[RequestRecord], events: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """Per tenant, over its ok answers with a reference: n, exact and prefix match, leaks (its answers
    naming another tenant's value), the newest adapter version in its answers and the publishes seen
    (`events` with its tenant). Then the mean of the tenants' exact-match rates (each tenant counts
    once), the tenant with the lowest, and the leaks in all. None without tenant records."""
    by_tenant: dict[str, list[RequestRecord]] = {}
    for record in records:
        if (record.ok and record.tenant is not None and record.reference is not None
                and record.kind in GENERATION_KINDS):
            by_tenant.setdefault(record.tenant, []).append(record)
    if not by_tenant:
        return None
    per_tenant: dict[str, dict[str, Any]] = {}
    examples: list[dict[str, Any]] = []
    for tenant in sorted(by_tenant):
        group = by_tenant[tenant]
        leaks = 0
        for record in group:
            if values := leaked(record):
                leaks += 1
                if len(examples) < LEAK_EXAMPLES:
                    examples.append({"tenant": tenant, "trace_id": record.trace_id, "answer": record.answer,
                                     "reference": record.reference, "leaked": values})
        versions = [r.adapter_version for r in group if r.adapter_version is not None]
        per_tenant[tenant] = {
            "n": float(len(group)),
            "exact": sum(exact_match(r.answer, r.reference or "") for r in group) / len(group),
            "prefix": sum(prefix_match(r.answer, r.reference or "") for r in group) / len(group),
            "leaks": leaks,
            "version": max(versions) if versions else None,
            "publishes": sum(e.get("kind") == "adapter" and e.get("tenant") == tenant and not e.get("initial")
                             for e in events),
        }
    lowest = min(per_tenant, key=lambda t: (per_tenant[t]["exact"], t))
    return {
        "tenants": len(per_tenant),
        "scored": sum(len(group) for group in by_tenant.values()),
        "mean_exact": sum(stats["exact"] for stats in per_tenant.values()) / len(per_tenant),
        "min_exact": per_tenant[lowest]["exact"],
        "min_tenant": lowest,
        "leaks": sum(stats["leaks"] for stats in per_tenant.values()),
        "leak_examples": examples,
        "per_tenant": per_tenant,
    }


def alignment(records: Iterable[RequestRecord]) -> dict[str, dict[str, float]]:
    """Per phase, over ok requests with a reference answer: n, exact-match rate, prefix-match rate."""
    by_phase: dict[str, list[RequestRecord]] = {}
    for record in records:
        if record.ok and record.reference is not None and record.kind in GENERATION_KINDS:
            by_phase.setdefault(str(record.phase), []).append(record)
    result: dict[str, dict[str, float]] = {}
    for phase in sorted(by_phase, key=_phase_order):
        group = by_phase[phase]
        assert all(r.reference is not None for r in group)
        exact = sum(exact_match(r.answer, r.reference or "") for r in group)
        prefix = sum(prefix_match(r.answer, r.reference or "") for r in group)
        result[phase] = {"n": float(len(group)), "exact": exact / len(group), "prefix": prefix / len(group)}
    return result


def _phase_order(phase: str) -> tuple[int, str]:
    return (int(phase), "") if phase.lstrip("-").isdigit() else (1 << 30, phase)


def run_duration(records: Sequence[RequestRecord]) -> float:
    """From the first arrival to the last end (or start, for requests without an end)."""
    if not records:
        return 0.0
    first = min(r.arrival_s for r in records)
    last = max(r.end_s if r.end_s is not None else r.start_s for r in records)
    return max(last - first, 0.0)


def summarize(
    records: Sequence[RequestRecord],
    slo: dict[str, float] | None = None,
    duration_s: float | None = None,
    events: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The summary of a run; `duration_s` defaults to the span of the records. `events` are the
    runner's (adapter versions newer than the first one seen count as publishes)."""
    slo = slo or {}
    generations = [r for r in records if r.kind in GENERATION_KINDS and r.status != "cancelled"]
    feedback = [r for r in records if r.kind == "feedback"]
    ok = [r for r in generations if r.ok]
    duration = run_duration(records) if duration_s is None else duration_s
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    met = [r for r in generations if meets_slo(r, slo)]
    attainment: dict[str, float | None] = {
        key: _fraction(sum(meets_slo(r, {key: limit}) for r in generations), len(generations))
        for key, limit in slo.items()
    }
    attainment["all"] = _fraction(len(met), len(generations)) if slo else None
    failures: dict[str, int] = {}
    for record in generations:
        if not record.ok:
            failures[record.status] = failures.get(record.status, 0) + 1
    versions = sorted({r.adapter_version for r in ok if r.adapter_version is not None})
    return {
        "requests": len(generations),
        "ok": len(ok),
        "failed": len(generations) - len(ok),
        "failures": failures,
        "cancelled": sum(r.status == "cancelled" for r in records),
        "duration_s": duration,
        "throughput_rps": per_second(len(ok)),
        "output_tokens": output_tokens,
        "output_tok_s": per_second(output_tokens),
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": distribution([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo": slo,
        "goodput_rps": per_second(len(met)) if slo else None,
        "slo_attainment": attainment,
        "feedback": {"sent": len(feedback), "ok": sum(r.ok for r in feedback)},
        "adapter_versions": versions,
        "adapter_publishes": [  # the shared lineage's; tenants' are counted under "tenants"
            {"time_s": e["time_s"], "version": e["version"]}
            for e in events if e.get("kind") == "adapter" and not e.get("initial") and e.get("tenant") is None
        ],
        "alignment": alignment(generations),
        "tenants": tenant_alignment(generations, events),
    }


def _fraction(part: int, whole: int) -> float | None:
    return part / whole if whole else None
