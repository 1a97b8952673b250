"""`AsyncEngine`: the engine's event-loop side. Admission, requests in, text deltas out.

    admit() -> generate() -> inbox -> engine thread (core.py)
    engine thread -> deliver -> call_soon_threadsafe -> per-request asyncio.Queue -> detokenizer -> caller

Cancelling the `generate()` iterator (the client went away) aborts the request at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mace.config import MaceConfig
from mace.engine.admission import Admission, Overloaded, RequestRejected, ShuttingDown
from mace.engine.core import EngineCore
from mace.engine.detokenizer import IncrementalDetokenizer
from mace.engine.inbox import Abort, Activate, AddRequest, EngineMessage, Ingest, InstallLineage
from mace.engine.load import EngineLoad
from mace.engine.request import ACTIVE_VERSION, Request, RequestOutput, SamplingParams
from mace.model.loader import ModelBundle
from mace.tenancy import SHARED, tenant_dir
from mace.train.adapters import read_catalog
from mace.train.lineage import lineage_of
from mace.train.publish_gate import AdapterCatalog
from mace.train.scope import prompt_words
from mace.train.trainer import Trainer


class AsyncEngine:
    def __init__(self, bundle: ModelBundle, config: MaceConfig, trainer: Trainer | None = None) -> None:
        self.core = EngineCore(bundle, config, trainer)
        self.config = config
        self.tokenizer: Any = bundle.tokenizer
        self.num_generations = 0  # admitted and not yet released: running or waiting in the engine
        self.is_admitting = True
        self._loop_done: concurrent.futures.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}

    # ---- lifecycle ----

    def start(self, model_thread: concurrent.futures.Executor | None = None) -> None:
        """Run the step loop on `model_thread` (the one-worker executor that loaded the model) or a new thread.

        Keeping every torch call on one OS thread matters on CPU: a second thread that has run OpenMP
        work (loading the model, say) leaves a thread team behind that slows the engine's kernels.
        """
        self._loop = asyncio.get_running_loop()
        self.core.deliver = self._deliver
        if model_thread is None:
            model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mace-engine")
        self.notify_feedback()  # samples acknowledged before a restart are trained without waiting for a POST
        self._loop_done = model_thread.submit(self.core.run_loop)

    @property
    def is_running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.core.inbox.stop()
        if self._loop_done is not None:
            concurrent.futures.wait([self._loop_done], timeout=timeout_s)
        self.core.runner.streams.close()
        if self.core.trainer is not None:
            self.core.trainer.close()

    def close_admission(self) -> None:
        """A graceful shutdown: new requests are refused, running ones finish."""
        self.is_admitting = False

    # ---- what the server reads ----

    @property
    def load(self) -> EngineLoad:
        """The snapshot the engine thread published after its last step."""
        return self.core.load

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def adapter_version(self) -> int:
        """The version new requests pin."""
        return self.core.adapter_version

    @property
    def has_trainer(self) -> bool:
        """Whether journaled feedback is trained on (a retraining policy is on)."""
        return self.core.trainer is not None

    def adapters(self) -> AdapterCatalog:
        """The shared lineage's published adapter versions, from memory (none without a trainer)."""
        if self.core.trainer is None:
            return AdapterCatalog((), auto_publish=False)
        catalog = self.core.trainer.adapters(SHARED)
        assert catalog is not None, "the shared lineage is always resident"
        return catalog

    def lineage_of(self, tenant: str) -> str:
        """The lineage `tenant`'s requests and samples use: its own under `train.tenancy = "per_tenant"`,
        else the shared one."""
        return lineage_of(tenant, self.config.train)  # by the config, whether training is on or not

    async def catalog(self, tenant: str = SHARED) -> AdapterCatalog:
        """`tenant`'s lineage's published versions (from its directory when it is not in memory)."""
        trainer = self.core.trainer
        if trainer is None:
            return AdapterCatalog((), auto_publish=False)
        lineage = trainer.lineage_of(tenant)
        catalog = trainer.adapters(lineage)
        if catalog is not None:
            return catalog
        # Read, not brought back: listing a lineage (or one that never existed) changes nothing.
        root = tenant_dir(self.config.data_dir, lineage) / "adapters"
        versions, active = await asyncio.to_thread(read_catalog, root)
        newest = max((v.version for v in versions), default=0)
        return AdapterCatalog(tuple(versions), auto_publish=active == newest, active=active)

    async def _bring_back(self, lineage: str) -> None:
        """Read an evicted (or new) lineage off the engine thread and queue it ahead of its request, so
        that the engine thread only copies its tensors, at a step boundary."""
        trainer = self.core.trainer
        if trainer is not None and not trainer.is_resident(lineage):
            self._submit(InstallLineage(await asyncio.wrap_future(trainer.request_lineage(lineage))))

    # ---- admission ----

    def admit(self, num_prompt_tokens: int, max_tokens: int | None, slo_class: str | None) -> Admission:
        """Every check a generation passes before it is queued, in this order: shutdown, the prompt, the
        room left for `max_tokens`, the SLO class, the count of generations, the waiting queue, and
        the TTFT prediction. Raises ShuttingDown, RequestRejected or Overloaded."""
        if not self.is_admitting:
            raise ShuttingDown("the server is shutting down; retry on another replica or after the restart")
        self.check_request(num_prompt_tokens)
        self._check_room(num_prompt_tokens, max_tokens)
        chosen = self.resolve_slo_class(slo_class)
        self._check_capacity()
        self._check_predicted_ttft(num_prompt_tokens, chosen)
        self.num_generations += 1
        return Admission(chosen, self._end_generation)

    def _end_generation(self) -> None:
        self.num_generations -= 1

    def check_request(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise RequestRejected("the prompt is empty", param="prompt", code="context_length_exceeded")
        if num_prompt_tokens >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {num_prompt_tokens} tokens; this model's context is {self.max_model_len} "
                "tokens including the completion",
                param="messages", code="context_length_exceeded",
            )

    def _check_room(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        room = self.max_model_len - num_prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise RequestRejected(
                f"max_tokens is {max_tokens} but the prompt's {num_prompt_tokens} tokens leave room for {room} "
                f"in this model's {self.max_model_len}-token context",
                param="max_tokens", code="context_length_exceeded",
            )

    def resolve_slo_class(self, name: str | None) -> str:
        """The configured class `name` (the default class if None); RequestRejected if unknown."""
        slo = self.config.slo
        chosen = slo.default_class if name is None else name
        if chosen not in slo.class_names:
            raise RequestRejected(f"unknown SLO class {chosen!r}; this server has {', '.join(slo.class_names)}",
                                  param="mace_slo", code="invalid_slo_class")
        return chosen

    def _check_capacity(self) -> None:
        """Generations are counted here as they arrive, so a burst is bounded before the engine sees it."""
        capacity = self.config.engine.max_num_seqs + self.config.server.max_waiting_requests
        if self.num_generations >= capacity:
            raise Overloaded(f"the server is at capacity ({capacity} generations running or waiting); retry shortly",
                             retry_after_s=1, code="queue_full")
        if self.load.num_waiting >= self.config.server.max_waiting_requests:
            raise Overloaded("the server is at capacity; retry shortly", retry_after_s=1, code="queue_full")

    def _check_predicted_ttft(self, num_prompt_tokens: int, slo_class: str) -> None:
        """Shed a request when the queue is past its bound and the latency model predicts that, even
        admitted now, it would miss its TTFT target. First-come-first-served sheds nothing."""
        engine = self.config.engine
        if engine.scheduling != "slo" or self.load.num_waiting < engine.shed_queue_depth:
            return
        target_s = self.config.slo.target(slo_class).ttft_s
        # Reads the scheduler's queues from the event loop; `predict_ttft_s` copies them before it iterates.
        predicted_s = self.core.scheduler.predict_ttft_s(num_prompt_tokens, target_s, time.monotonic())
        if predicted_s > target_s:
            raise Overloaded(
                f"the server is overloaded: a request of class {slo_class!r} would get its first token in about "
                f"{predicted_s:.1f}s, past its {target_s:g}s target; retry shortly",
                retry_after_s=max(1, math.ceil(predicted_s - target_s)), code="overloaded", slo_class=slo_class,
            )

    # ---- requests ----

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        slo_class: str | None = None, priority: int = 0, admission: Admission | None = None, tenant: str = SHARED,
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs with their text until the request finishes; closing the iterator early aborts it.
        The request runs with the active version of `tenant`'s lineage (`lineage_of`).

        With an `admission` from `admit()` the request's checks have run already; without one (library
        use, tests) the prompt and SLO class are checked here."""
        if admission is None:
            self.check_request(len(prompt_token_ids))
            slo_class = self.resolve_slo_class(slo_class)
        else:
            slo_class = admission.slo_class
        lineage = self.lineage_of(tenant)
        await self._bring_back(lineage)
        request = self._request(prompt_token_ids, params, request_id, slo_class, priority, lineage)
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request.request_id] = stream
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        finished = False
        self._submit(AddRequest(request))
        try:
            while not finished:
                output = await stream.get()
                text = detokenizer.add(output.new_token_ids)
                finish_reason = output.finish_reason
                if detokenizer.stopped_by is not None and finish_reason is None:
                    finish_reason = "stop"
                    self.abort(request.request_id)
                if finish_reason is not None:
                    text += detokenizer.finish()
                    finished = True
                yield dataclasses.replace(output, text=text, finish_reason=finish_reason)
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def _request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None,
                 slo_class: str, priority: int, lineage: str) -> Request:
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already in flight", param="request_id")
        target = self.config.slo.target(slo_class)
        return Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params,
            eos_token_ids=self.core.bundle.eos_token_ids, max_model_len=self.max_model_len,
            arrival_time_s=time.monotonic(), adapter_version=ACTIVE_VERSION, tenant=lineage,
            slo_class=slo_class, ttft_s=target.ttft_s, tpot_s=target.tpot_s, priority=priority,
            prompt_words=self._prompt_words(prompt_token_ids),
        )

    def _prompt_words(self, prompt_token_ids: list[int]) -> frozenset[str]:
        """Its words for the lineage's scope, read here rather than on the engine thread (a decode of the
        prompt, about a millisecond for a thousand tokens)."""
        if self.core.trainer is None or self.config.train.scope_similarity <= 0:
            return frozenset()
        return prompt_words(self.tokenizer.decode(prompt_token_ids))

    def abort(self, request_id: str) -> None:
        self._submit(Abort(request_id))

    def notify_feedback(self) -> None:
        """New samples are in the journal: score them on the engine thread between steps."""
        if self.core.trainer is not None:
            self._submit(Ingest())

    async def activate(self, version: int, tenant: str = SHARED) -> None:
        """Serve `version` of `tenant`'s lineage to its new requests from the next step on (rollback or forward)."""
        if self.core.trainer is None:
            raise RequestRejected("no retraining policy is on, so only version 0 exists", param="version")
        lineage = self.lineage_of(tenant)
        await self._bring_back(lineage)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def reply(error: BaseException | None) -> None:
            if error is None:
                loop.call_soon_threadsafe(done.set_result, None)
            else:
                loop.call_soon_threadsafe(done.set_exception, error)

        self._submit(Activate(version, reply, lineage))
        await done

    def _submit(self, message: EngineMessage) -> None:
        self.core.inbox.put(message)

    # ---- outputs, from the engine thread ----

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)
