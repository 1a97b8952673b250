"""Prometheus metrics under `mace:`, named after vLLM's, in a registry owned by one app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mace.engine.engine import EngineStats
from mace.train.trainer import TrainStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
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
        self._gauge("mace:num_requests_running", "Requests in the running batch.", lambda s: s.num_running)
        self._gauge("mace:num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting)
        self._gauge("mace:kv_cache_usage_perc", "Share of KV blocks in use (0-1).",
                    lambda s: s.kv_blocks_used / s.kv_blocks_total)
        self._gauge("mace:kv_cache_blocks_total", "KV blocks in the budget.", lambda s: s.kv_blocks_total)
        self._gauge("mace:kv_cache_blocks_used", "KV blocks held by requests.", lambda s: s.kv_blocks_used)
        self._gauge("mace:kv_cache_used_bytes", "Bytes of KV budget held by requests.",
                    lambda s: s.kv_blocks_used * s.kv_block_size * s.kv_bytes_per_token)
        self._gauge("mace:kv_cache_allocated_bytes", "Bytes of KV tensors allocated.",
                    lambda s: s.kv_bytes_allocated)
        self._gauge("mace:num_preemptions_total", "Requests preempted so far.", lambda s: s.num_preemptions)
        self._memory_gauges()
        self._gauge("mace:engine_steps_total", "Engine iterations so far.", lambda s: s.num_steps)
        self._gauge("mace:engine_step_seconds_total", "Wall time inside engine steps.",
                    lambda s: s.step_time_s_total)
        self._gauge("mace:engine_forward_seconds_total", "Wall time inside the model forward.",
                    lambda s: s.forward_time_s_total)

        self._train_gauges()

    def _memory_gauges(self) -> None:
        """The one memory budget and the prefix cache (queries and hits count prompt tokens, as in vLLM)."""
        gauge = self._gauge
        gauge("mace:kv_cache_blocks_cached", "KV blocks holding cached prefixes no request uses (evictable).",
              lambda s: s.kv_blocks_cached)
        gauge("mace:kv_cache_cached_bytes", "Bytes of cached prefix KV.", lambda s: s.kv_bytes_cached)
        gauge("mace:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
              lambda s: s.prefix_cache_queries)
        gauge("mace:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", lambda s: s.prefix_cache_hits)
        gauge("mace:memory_budget_bytes", "The one budget for KV, training and adapters.",
              lambda s: s.memory_budget_bytes)
        gauge("mace:memory_learning_bytes", "Budget held for adapter versions and the learner's optimizer state.",
              lambda s: s.memory_learning_bytes)
        gauge("mace:memory_training_reserved_bytes", "Budget reserved for training activations now.",
              lambda s: s.memory_training_bytes)

    def _train_gauges(self) -> None:
        """Learning: zero (or NaN for losses) while no retraining policy runs."""
        train = self._train_gauge
        train("mace:train_tokens_total", "Training tokens processed.", lambda t: t.train_tokens_total)
        train("mace:train_seconds_total", "Wall time spent in training micro-steps.", lambda t: t.train_seconds_total)
        train("mace:train_optimizer_steps_total", "Optimizer steps taken.", lambda t: t.num_optimizer_steps)
        train("mace:train_skipped_steps_total", "Optimizer steps skipped for NaN/inf.", lambda t: t.num_skipped_steps)
        train("mace:train_pending_samples", "Samples the trainer can draw.", lambda t: t.num_trainable)
        train("mace:learner_loss", "Learner's recent training loss.", lambda t: t.learner_loss)
        train("mace:heldout_loss_serving", "Held-out loss of the serving version, as the last gate "
              "measured it (NaN after a manual activation until the next gate).", lambda t: t.serving_heldout_loss)
        train("mace:heldout_loss_learner", "Held-out loss of the learner.", lambda t: t.learner_heldout_loss)
        train("mace:adapter_active_version", "Adapter version new requests use.", lambda t: t.active_version)
        train("mace:seconds_since_publish", "Seconds since the last publish.", lambda t: t.seconds_since_publish)
        train("mace:drift_signal", "Intake loss relative to its value at the last publish.", lambda t: t.drift)
        self._gauge("mace:train_step_time_share", "Share of engine step time spent training (0-1).",
                    lambda s: s.train.train_seconds_total / s.step_time_s_total
                    if s.train is not None and s.step_time_s_total > 0 else 0.0)
        self._gauge("mace:latency_model_error_seconds", "Measured minus predicted time of the last step.",
                    lambda s: s.latency_error_s)
        self._gauge("mace:latency_margin_seconds",
                    "Headroom planners keep under TPOT targets (model overrun p95 plus the outcome guard).",
                    lambda s: s.latency_margin_s)
        self._gauge("mace:decode_cap", "The most requests the scheduler runs at once (the TPOT-bound cap under SLO "
                    "scheduling).", lambda s: s.decode_cap)

    def _train_gauge(self, name: str, documentation: str, read: Callable[[TrainStats], float]) -> None:
        self._gauge(name, documentation, lambda s: read(s.train) if s.train is not None else 0.0)

    def _gauge(self, name: str, documentation: str, read: Callable[[EngineStats], float]) -> None:
        def value() -> float:
            stats = self._stats()
            return float(read(stats)) if stats is not None else 0.0

        Gauge(name, documentation, registry=self.registry).set_function(value)
