"""Users, locust-style on asyncio: classes with a `weight`, a `wait_time` and `@task(weight)` methods.

A closed-loop user runs its tasks one after another with a wait between them (`User.run`). Open-loop
arrival processes call `User.execute(item)` directly for each arrival instead. Kinds: `ChatUser`
(streaming chat over SSE), `CompletionUser` (streaming text completion), `WsChatUser` (chat over
/v1/ws) and `FeedbackUser` (streaming chat that sends corrections for a fraction of its requests).
A trace item with a tenant is sent with OpenAI's `user` field set to it, and so are its corrections.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from loadgen.arrivals import WaitTime, constant
from loadgen.context import RunContext
from loadgen.metrics import RequestRecord
from loadgen.traces import TraceItem
from mace.client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    GenerationResult,
    MaceError,
    StreamError,
    WsChatSession,
)

TaskFn = Callable[[Any], Awaitable[None]]


def task(weight: int = 1) -> Callable[[TaskFn], TaskFn]:
    """Mark a coroutine method as a task picked with this relative weight (locust's `@task`)."""

    def mark(fn: TaskFn) -> TaskFn:
        fn._task_weight = weight  # type: ignore[attr-defined]
        return fn

    return mark


def failure_status(exc: BaseException) -> str:
    """The record status of a failed request; order matters (timeouts are connection errors)."""
    if isinstance(exc, StreamError):
        return "error_event"
    if isinstance(exc, APIStatusError):
        return f"http_{exc.status}"
    if isinstance(exc, APITimeoutError):
        return "timeout"
    if isinstance(exc, APIConnectionError):
        return "connection"
    return "exception"


class User:
    weight: ClassVar[float] = 1.0
    wait_time: ClassVar[WaitTime] = constant(0.0)
    kind: ClassVar[str] = "chat"

    def __init__(self, ctx: RunContext, name: str, seed: int = 0) -> None:
        self.ctx = ctx
        self.name = name
        self.rng = random.Random(f"{name}-{seed}")  # per user: concurrency does not reorder draws
        # Looked up on the class, so a subclass that redefines a task replaces it (as in locust).
        self.tasks: list[tuple[Callable[[], Awaitable[None]], float]] = [
            (getattr(self, attr), float(getattr(type(self), attr)._task_weight))
            for attr in sorted(dir(type(self)))
            if hasattr(getattr(type(self), attr, None), "_task_weight")
        ]

    async def on_start(self) -> None:
        """Called once before the user's first request."""

    async def on_stop(self) -> None:
        """Called once after its last request, even when the run was cut short."""

    async def run(self) -> None:
        """The closed loop: task, wait, task, ... until the run stops or the workload runs out."""
        while not self.ctx.stopping and not self.ctx.workload.exhausted:
            fn = self.rng.choices([fn for fn, _ in self.tasks], [w for _, w in self.tasks])[0]
            await fn()
            if not await self.ctx.sleep(self.wait_time()):
                break

    @task(1)
    async def ask(self) -> None:
        """The default task: the next item of the workload."""
        item = self.ctx.workload.claim()
        if item is not None:
            await self.execute(item, self.ctx.now())

    async def execute(self, item: TraceItem, arrival_s: float) -> RequestRecord:
        record = RequestRecord(
            request_id="", kind=self.kind, user=self.name, phase=item.phase, arrival_s=arrival_s,
            reference=item.reference, trace_id=item.id, tenant=item.tenant, other_answers=item.other_answers,
        )
        started = time.perf_counter()
        record.start_s = self.ctx.now()
        try:
            result = await self.generate(item, record, started)
        except asyncio.CancelledError:
            record.status = "cancelled"
            self.ctx.recorder.add(record)
            raise
        except Exception as exc:  # any failure is data, never the end of the run
            record.status, record.error = failure_status(exc), f"{type(exc).__name__}: {exc}"[:500]
        else:
            record.request_id = result.request_id or record.request_id
            record.finish_reason = result.finish_reason
            record.adapter_version = result.adapter_version
            if result.usage is not None:
                record.prompt_tokens = result.usage.prompt_tokens
                record.output_tokens = result.usage.completion_tokens
        record.e2e_s = time.perf_counter() - started
        self.ctx.recorder.add(record)
        await self.after(item, record)
        return record

    async def generate(self, item: TraceItem, record: RequestRecord, started: float) -> GenerationResult:
        raise NotImplementedError

    async def after(self, item: TraceItem, record: RequestRecord) -> None:
        """Called after each request (FeedbackUser sends its correction here)."""

    def params(self, item: TraceItem) -> dict[str, Any]:
        """The request's fields besides its messages or prompt; an item's tenant goes in OpenAI's `user`."""
        params: dict[str, Any] = {"max_tokens": item.max_tokens, **self.ctx.sampling}
        if item.tenant is not None:
            params["user"] = item.tenant
        return params


async def timed(chunks: AsyncIterator[str], record: RequestRecord, started: float) -> None:
    """Consume the text deltas, recording TTFT (first non-empty delta) and the gaps between deltas."""
    parts: list[str] = []
    last: float | None = None
    async for text in chunks:
        if not text:
            continue
        now = time.perf_counter()
        if last is None:
            record.ttft_s = now - started
        else:
            record.itl_s.append(now - last)
        last = now
        parts.append(text)
    record.answer = "".join(parts)


class ChatUser(User):
    kind = "chat"

    async def generate(self, item: TraceItem, record: RequestRecord, started: float) -> GenerationResult:
        async with self.ctx.client.chat(item.messages, stream=True, **self.params(item)) as stream:
            record.request_id = stream.request_id or ""
            await timed(stream, record, started)
            return stream.result


class CompletionUser(User):
    kind = "completion"

    async def generate(self, item: TraceItem, record: RequestRecord, started: float) -> GenerationResult:
        async with self.ctx.client.complete(render_prompt(item), stream=True, **self.params(item)) as stream:
            record.request_id = stream.request_id or ""
            await timed(stream, record, started)
            return stream.result


def render_prompt(item: TraceItem) -> str:
    """The chat as plain text, for servers' raw completion endpoint."""
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in item.messages]
    return "\n".join([*lines, "assistant:"])


class WsChatUser(User):
    """One websocket per user; open-loop arrivals multiplex up to 16 conversations on it (the
    server's limit per socket), the rest wait for a free slot."""

    kind = "ws"
    max_conversations = 16

    def __init__(self, ctx: RunContext, name: str, seed: int = 0) -> None:
        super().__init__(ctx, name, seed)
        self._stack = contextlib.AsyncExitStack()
        self._session: WsChatSession | None = None
        self._slots = asyncio.Semaphore(self.max_conversations)
        self._connecting = asyncio.Lock()

    async def _connected(self) -> WsChatSession:
        async with self._connecting:
            if self._session is None or self._session.closed:
                await self._stack.aclose()  # a broken socket: reconnect
                self._session = await self._stack.enter_async_context(self.ctx.client.ws_chat())
            return self._session

    async def generate(self, item: TraceItem, record: RequestRecord, started: float) -> GenerationResult:
        async with self._slots:
            session = await self._connected()
            record.request_id = f"ws-{uuid.uuid4().hex[:12]}"
            async with session.chat(item.messages, conversation_id=record.request_id, **self.params(item)) as conv:
                await timed(conv, record, started)
                return conv.result

    async def on_stop(self) -> None:
        with contextlib.suppress(MaceError):
            await self._stack.aclose()


class FeedbackUser(ChatUser):
    """Streaming chat; after a request whose trace item carries feedback, sends it as a correction
    to POST /v1/feedback with probability `feedback_fraction` (linked by `request_id`). A server
    without that endpoint (404) fails the feedback record, not the run."""

    feedback_fraction: float = 1.0

    async def after(self, item: TraceItem, record: RequestRecord) -> None:
        if not item.feedback or self.rng.random() >= self.feedback_fraction or self.ctx.stopping:
            return
        samples = [{**s, "request_id": record.request_id} if record.request_id else s for s in item.feedback]
        if item.tenant is not None:  # the tenant's own lineage learns it (a sample's own `user` wins)
            samples = [{"user": item.tenant, **s} for s in samples]
        sent = RequestRecord(
            request_id=f"fb-{record.request_id or item.id}", kind="feedback", user=self.name, phase=item.phase,
            arrival_s=self.ctx.now(), start_s=self.ctx.now(), trace_id=item.id, tenant=item.tenant,
        )
        started = time.perf_counter()
        try:
            ids = await self.ctx.client.feedback(samples)
        except MaceError as exc:
            sent.status, sent.error = failure_status(exc), f"{type(exc).__name__}: {exc}"[:500]
        else:
            sent.answer = ",".join(str(i) for i in ids) or None
        sent.e2e_s = time.perf_counter() - started
        self.ctx.recorder.add(sent)


USER_KINDS: dict[str, type[User]] = {
    "chat": ChatUser, "completion": CompletionUser, "ws": WsChatUser, "feedback": FeedbackUser,
}
