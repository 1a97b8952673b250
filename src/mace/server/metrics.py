"""Prometheus metrics under `mace:`, named after vLLM's, in a registry owned by one app.

The request path records the counters and histograms as requests go; the engine's gauges come from
one collector (`LoadCollector`) that reads the engine's last `EngineLoad` snapshot once per scrape.
Tenant names appear as labels only for the few lineages the snapshot lists (the top ones by training
time), the rest summed under `_other`, so the number of series stays bounded however many tenants come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mace.engine.api import EngineLoad, TrainStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, load: Callable[[], EngineLoad | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "mace:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "mace:inter_token_latency_seconds", "Time between streamed tokens.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "mace:e2e_request_latency_seconds", "Request latency, arrival to last token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "mace:request_queue_time_seconds", "Time waiting before the first schedule.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("mace:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("mace:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "mace:request_success", "Requests finished, by finish reason.", ["finished_reason"], registry=r
        )
        self.slo_requests = Counter(
            "mace:slo_requests", "Requests finished (stop or length), by SLO class.", ["slo_class"], registry=r
        )
        self.slo_met = Counter(
            "mace:slo_met", "Requests that met all their SLOs (goodput = rate), by class.", ["slo_class"], registry=r
        )
        self.slo_violations = Counter(
            "mace:slo_violations", "Requests that missed an SLO, by class and kind (ttft, tpot).",
            ["slo_class", "kind"], registry=r,
        )
        self.requests_shed = Counter(
            "mace:requests_shed", "Requests answered 429 because they were predicted to miss their TTFT.",
            ["slo_class"], registry=r,
        )
        r.register(LoadCollector(load))


def _train(read: Callable[[TrainStats], float]) -> Callable[[EngineLoad], float]:
    """Learning gauges read zero while no retraining policy runs."""
    return lambda s: read(s.train) if s.train is not None else 0.0


# (name, help, reader) for every gauge; all of them read the same snapshot.
GAUGES: tuple[tuple[str, str, Callable[[EngineLoad], float]], ...] = (
    ("mace:num_requests_running", "Requests in the running batch.", lambda s: s.num_running),
    ("mace:num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting),
    ("mace:kv_cache_usage_perc", "Share of KV blocks in use (0-1).", lambda s: s.kv_blocks_used / s.kv_blocks_total),
    ("mace:kv_cache_blocks_total", "KV blocks in the budget.", lambda s: s.kv_blocks_total),
    ("mace:kv_cache_blocks_used", "KV blocks held by requests.", lambda s: s.kv_blocks_used),
    ("mace:kv_cache_used_bytes", "Bytes of KV budget held by requests.", lambda s: s.kv_used_bytes),
    ("mace:kv_cache_allocated_bytes", "Bytes of KV tensors allocated.", lambda s: s.kv_bytes_allocated),
    ("mace:num_preemptions_total", "Requests preempted so far.", lambda s: s.num_preemptions),
    # The one memory budget and the prefix cache (queries and hits count prompt tokens, as in vLLM).
    ("mace:kv_cache_blocks_cached", "KV blocks holding cached prefixes no request uses (evictable).",
     lambda s: s.kv_blocks_cached),
    ("mace:kv_cache_cached_bytes", "Bytes of cached prefix KV.", lambda s: s.kv_bytes_cached),
    ("mace:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
     lambda s: s.prefix_cache_queries),
    ("mace:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", lambda s: s.prefix_cache_hits),
    ("mace:memory_budget_bytes", "The one budget for KV, training and adapters.", lambda s: s.memory_budget_bytes),
    ("mace:memory_learning_bytes", "Budget held for adapter versions and the learner's optimizer state.",
     lambda s: s.memory_learning_bytes),
    ("mace:memory_training_reserved_bytes", "Budget reserved for training activations now.",
     lambda s: s.memory_training_bytes),
    ("mace:engine_steps_total", "Engine iterations so far.", lambda s: s.num_steps),
    ("mace:engine_step_seconds_total", "Wall time inside engine steps.", lambda s: s.step_time_s_total),
    ("mace:engine_forward_seconds_total", "Wall time inside the model forward.", lambda s: s.forward_time_s_total),
    # Learning: zero (or NaN for losses) while no retraining policy runs.
    ("mace:train_tokens_total", "Training tokens processed.", _train(lambda t: t.train_tokens_total)),
    ("mace:train_seconds_total", "Wall time spent in training micro-steps.", _train(lambda t: t.train_seconds_total)),
    ("mace:train_optimizer_steps_total", "Optimizer steps taken.", _train(lambda t: t.num_optimizer_steps)),
    ("mace:train_skipped_steps_total", "Optimizer steps skipped for NaN/inf.", _train(lambda t: t.num_skipped_steps)),
    ("mace:train_pending_samples", "Samples the trainer can draw.", _train(lambda t: t.num_trainable)),
    ("mace:train_resting", "1 while the learner fits every sample it has (under train.converged_loss): the "
     "mace policy rests until new feedback arrives.", _train(lambda t: float(t.is_converged))),
    ("mace:learner_loss", "Learner's recent training loss.", _train(lambda t: t.learner_loss)),
    ("mace:heldout_loss_serving", "Held-out loss of the serving version, as the last gate measured it (NaN after "
     "a manual activation until the next gate).", _train(lambda t: t.serving_heldout_loss)),
    ("mace:heldout_loss_learner", "Held-out loss of the learner.", _train(lambda t: t.learner_heldout_loss)),
    ("mace:adapter_active_version", "Adapter version new requests use.", _train(lambda t: t.active_version)),
    ("mace:seconds_since_publish", "Seconds since the last publish.", _train(lambda t: t.seconds_since_publish)),
    ("mace:drift_signal", "Intake loss relative to its value at the last publish.", _train(lambda t: t.drift)),
    ("mace:tenants", "Tenant lineages known since start.", _train(lambda t: t.num_tenants)),
    ("mace:tenants_resident", "Tenant lineages loaded in memory now (train.max_resident_tenants).",
     _train(lambda t: t.num_resident_tenants)),
    ("mace:train_step_time_share", "Share of engine step time spent training (0-1).",
     lambda s: s.train.train_seconds_total / s.step_time_s_total
     if s.train is not None and s.step_time_s_total > 0 else 0.0),
    ("mace:latency_model_error_seconds", "Measured minus predicted time of the last step.",
     lambda s: s.latency_error_s),
    ("mace:latency_margin_seconds",
     "Headroom planners keep under TPOT targets (model overrun p95 plus the outcome guard).",
     lambda s: s.latency_margin_s),
    ("mace:decode_cap", "The most requests the scheduler runs at once (the TPOT-bound cap under SLO scheduling).",
     lambda s: s.decode_cap),
)


class LoadCollector(Collector):
    """Every engine gauge from one read of the engine's snapshot (zero before the model has loaded)."""

    def __init__(self, load: Callable[[], EngineLoad | None]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._load()
        for name, documentation, read in GAUGES:
            yield GaugeMetricFamily(name, documentation, value=float(read(load)) if load is not None else 0.0)
        yield tenant_train_seconds(load.train if load is not None else None)


OTHER_TENANTS = "_other"
SHARED_LABEL = "_shared"  # an empty label value would read as no label at all


def tenant_train_seconds(train: TrainStats | None) -> GaugeMetricFamily:
    """Training time by lineage: the snapshot's top lineages by name, everything else as `_other`."""
    family = GaugeMetricFamily("mace:tenant_train_seconds_total", "Wall time spent training each lineage: the "
                               "top ones by training time by name, the rest summed under _other.",
                               labels=["tenant"])
    if train is None:
        return family
    for tenant in train.tenants:
        family.add_metric([tenant.tenant or SHARED_LABEL], tenant.train_seconds_total)
    family.add_metric([OTHER_TENANTS], train.other_tenants_train_seconds)
    return family
