"""From a validated request body to a stream of deltas: templating, tokenizing, the server's limits,
the engine's admission (`AsyncEngine.admit`), metrics, logs.

Shared by the HTTP API and the websocket so both behave the same on the same input.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from mace.engine.api import Admission, AsyncEngine, Overloaded, RequestOutput, RequestRejected, ShuttingDown
from mace.server.errors import ApiError
from mace.server.protocol import ChatCompletionRequest, CompletionRequest
from mace.server.runtime import Runtime

log = structlog.get_logger("mace.requests")


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    body: ChatCompletionRequest | CompletionRequest
    max_tokens: int
    created: int
    admission: Admission  # released when the answer is over (`with prepared.admission:`)
    tenant: str  # whose adapter lineage answers (`auth.resolve_tenant`)

    @property
    def slo_class(self) -> str:
        return self.admission.slo_class


def prepare_chat(runtime: Runtime, body: ChatCompletionRequest, tenant: str,
                 request_id: str | None = None) -> PreparedRequest:
    engine = _check_model(runtime, body)
    tokenizer = engine.tokenizer
    text = tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return _prepared(runtime, body, ids, request_id or f"chatcmpl-{uuid.uuid4().hex}", tenant)


def prepare_completion(runtime: Runtime, body: CompletionRequest, tenant: str) -> PreparedRequest:
    engine = _check_model(runtime, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        ids = [int(t) for t in prompt]
        vocab_size = len(engine.tokenizer)
        if any(not 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab_size})", param="prompt")
    else:
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return _prepared(runtime, body, ids, f"cmpl-{uuid.uuid4().hex}", tenant)


def _check_model(runtime: Runtime, body: ChatCompletionRequest | CompletionRequest) -> AsyncEngine:
    engine = runtime.ready_engine()
    if not runtime.accepts_model(body.model):
        raise ApiError(
            404, f"the model {body.model!r} does not exist; this server serves {runtime.served_model_name!r}",
            param="model", code="model_not_found",
        )
    return engine


def _prepared(
    runtime: Runtime, body: ChatCompletionRequest | CompletionRequest, ids: list[int], request_id: str, tenant: str
) -> PreparedRequest:
    """The server's own limits, then the engine's admission: the last check, as it takes a place."""
    engine = runtime.ready_engine()
    limits = runtime.config.server
    if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="prompt_too_long")
    requested = body.requested_max_tokens()
    if requested is not None and requested > limits.max_output_tokens:
        raise ApiError(400, f"max_tokens is {requested}; this server generates at most {limits.max_output_tokens}",
                       param="max_tokens", code="max_tokens_too_large")
    admission = _admit(runtime, engine, len(ids), requested, body.mace_slo)
    room = engine.max_model_len - len(ids)
    max_tokens = requested if requested is not None else min(limits.default_max_tokens, limits.max_output_tokens, room)
    return PreparedRequest(request_id, ids, body, max_tokens, int(time.time()), admission, tenant)


def _admit(runtime: Runtime, engine: AsyncEngine, num_prompt_tokens: int, max_tokens: int | None,
           slo_class: str | None) -> Admission:
    try:
        return engine.admit(num_prompt_tokens, max_tokens, slo_class)
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), code="shutting_down", retry_after_s=5) from None
    except RequestRejected as exc:
        raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
    except Overloaded as exc:
        if exc.slo_class is not None:
            runtime.metrics.requests_shed.labels(slo_class=exc.slo_class).inc()
        raise ApiError(429, str(exc), code=exc.code, retry_after_s=exc.retry_after_s) from None


async def generate(runtime: Runtime, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
    """Run the request; record its metrics and one summary log line however it ends."""
    engine = runtime.ready_engine()
    metrics = runtime.metrics
    params = prepared.body.sampling_params(prepared.max_tokens)
    started = last = time.monotonic()
    first_token_s: float | None = None
    final: RequestOutput | None = None
    try:
        async for delta in engine.generate(prepared.prompt_token_ids, params, prepared.request_id,
                                           priority=prepared.body.priority, admission=prepared.admission,
                                           tenant=prepared.tenant):
            now = time.monotonic()
            if delta.new_token_ids:
                if first_token_s is None:
                    first_token_s = now - started
                    metrics.time_to_first_token.observe(first_token_s)
                else:
                    metrics.inter_token_latency.observe(now - last)
                last = now
            if delta.finish_reason is not None:
                final = delta
            yield delta
    finally:
        _record(runtime, prepared, final, started, first_token_s)


def _record(
    runtime: Runtime,
    prepared: PreparedRequest,
    final: RequestOutput | None,
    started: float,
    first_token_s: float | None,
) -> None:
    metrics = runtime.metrics
    total_s = time.monotonic() - started
    finish_reason = final.finish_reason if final is not None else "abort"
    num_output = final.num_output_tokens if final is not None else 0
    metrics.e2e_latency.observe(total_s)
    metrics.prompt_tokens.inc(len(prepared.prompt_token_ids))
    metrics.generation_tokens.inc(num_output)
    metrics.request_success.labels(finished_reason=finish_reason).inc()
    if final is not None and final.queue_time_s is not None:
        metrics.queue_time.observe(final.queue_time_s)
    if finish_reason in ("stop", "length") and first_token_s is not None:
        _record_slo(runtime, prepared.slo_class, first_token_s, total_s, num_output)
    log.info(
        "request",
        request_id=prepared.request_id,
        prompt_tokens=len(prepared.prompt_token_ids),
        output_tokens=num_output,
        ttft_s=round(first_token_s, 4) if first_token_s is not None else None,
        total_s=round(total_s, 4),
        finish_reason=finish_reason,
        adapter_version=final.adapter_version if final is not None else None,
        slo_class=prepared.slo_class,
        tenant=prepared.tenant,
    )


def _record_slo(runtime: Runtime, slo_class: str, ttft_s: float, total_s: float, num_output: int) -> None:
    """Attainment per class and kind: TTFT, and TPOT as the mean gap after the first token."""
    metrics = runtime.metrics
    target = runtime.config.slo.target(slo_class)
    tpot_s = (total_s - ttft_s) / (num_output - 1) if num_output > 1 else 0.0
    metrics.slo_requests.labels(slo_class=slo_class).inc()
    missed = {"ttft": ttft_s > target.ttft_s, "tpot": tpot_s > target.tpot_s}
    for kind, is_missed in missed.items():
        if is_missed:
            metrics.slo_violations.labels(slo_class=slo_class, kind=kind).inc()
    if not any(missed.values()):
        metrics.slo_met.labels(slo_class=slo_class).inc()
