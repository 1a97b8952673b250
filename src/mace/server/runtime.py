"""The composition root: loads the model, opens the journal, builds the trainer and the engine, and
holds what the HTTP layer shares (the metrics, the requests in flight, the open websockets, the
shutdown state that a graceful shutdown (SIGTERM) sets before it drains running requests).

This is the one server module that imports `mace.model` and `mace.train`; the others see the
engine's public API (`mace.engine.api`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog
from aiohttp import WSCloseCode, web

from mace.config import MaceConfig
from mace.engine.api import AsyncEngine, EngineLoad
from mace.engine.warmup import warm_up
from mace.model.loader import ModelBundle, load_model
from mace.server.errors import ApiError
from mace.server.metrics import ServerMetrics
from mace.train.journal import Journal
from mace.train.trainer import Trainer

log = structlog.get_logger(__name__)

ModelLoad = Callable[[], ModelBundle]  # what tests pass instead of loading the configured model


class Runtime:
    def __init__(self, config: MaceConfig, load: ModelLoad | None = None) -> None:
        self.config = config
        self._load = load or (lambda: load_model(config.model, config.cache_dir))
        self.engine: AsyncEngine | None = None
        # One OS thread loads the model and then runs the engine: all torch work stays on it.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mace-engine")
        self.journal: Journal | None = None
        self.load_error: str | None = None
        self.journal_error: str | None = None
        self.metrics = ServerMetrics(self.load)
        self.served_model_name = config.server.served_model_name or config.model.name
        self.is_draining = False
        self.num_in_flight = 0  # HTTP API requests and websocket conversations being answered
        self._idle = asyncio.Event()
        self._idle.set()
        self.sockets: set[web.WebSocketResponse] = set()

    def load(self) -> EngineLoad | None:
        return self.engine.load if self.engine is not None else None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None or not self.engine.is_running:
            reason = self.load_error or "the model is still loading"
            raise ApiError(503, f"not ready: {reason}", code="not_ready", retry_after_s=5)
        return self.engine

    def check_open(self) -> None:
        """Shutdown closes every route under /v1/ (generations check it in `AsyncEngine.admit`)."""
        if self.is_draining:
            raise ApiError(503, "the server is shutting down; retry on another replica or after the restart",
                           code="shutting_down", retry_after_s=5)

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counts a request being answered, so that a drain knows when none is left."""
        self.num_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting requests, let running ones finish for up to `timeout_s`, then close websockets."""
        self.is_draining = True
        if self.engine is not None:
            self.engine.close_admission()
        started = time.monotonic()
        log.info("draining", in_flight=self.num_in_flight, timeout_s=timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain timed out; cutting the requests still running", in_flight=self.num_in_flight)
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        log.info("drained", seconds=round(time.monotonic() - started, 3), in_flight=self.num_in_flight)

    def accepts_model(self, name: str) -> bool:
        return name in (self.served_model_name, self.config.model.name)

    async def start(self) -> None:
        """Load the model off the event loop, so /health answers while it loads."""
        loop = asyncio.get_running_loop()
        try:
            bundle = await loop.run_in_executor(self._model_thread, self._load)
            self.journal = journal = self._open_journal()
            trainer = None
            if self.config.train.policy != "none" and journal is not None:
                trainer = await loop.run_in_executor(
                    self._model_thread, lambda: Trainer(bundle.causal_lm, bundle.tokenizer, journal, self.config)
                )
            engine = AsyncEngine(bundle, self.config, trainer)
            warmed = await loop.run_in_executor(self._model_thread, lambda: warm_up(engine.core))
            latency = engine.core.scheduler.latency
            log.info("engine warmed up", steps=warmed.steps, max_decodes=warmed.max_decodes,
                     latency_margin_s=round(latency.error_margin_s, 4), decode_cap=engine.load.decode_cap,
                     latency_model=latency.coefficients())
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load; /ready will answer 503 with the reason")
            return
        engine.start(self._model_thread)
        if self.is_draining:
            engine.close_admission()
        self.engine = engine
        log.info("engine ready", model=bundle.name, device=str(bundle.device), max_model_len=engine.max_model_len,
                 kv_blocks=engine.load.kv_blocks_total)

    def _open_journal(self) -> Journal | None:
        """A data dir that cannot hold the journal (read-only, full, not a directory) costs learning, not serving."""
        try:
            return Journal(self.config.data_dir / "journal.sqlite3", self.config.train.heldout_every)
        except (sqlite3.Error, OSError) as exc:
            self.journal_error = f"{type(exc).__name__}: {exc}"
            log.error("the journal cannot be opened; serving without feedback or training", error=self.journal_error,
                      data_dir=str(self.config.data_dir))
            return None

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()
