"""What the HTTP layer holds: the config, the engine once the model has loaded, the metrics, and the
admission state that a graceful shutdown (SIGTERM) closes before it drains running requests."""

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
from mace.engine.engine import Engine, EngineStats
from mace.engine.warmup import warm_up
from mace.model.loader import ModelBundle, load_model
from mace.server.errors import ApiError
from mace.server.metrics import ServerMetrics
from mace.train.intake import held_out_every
from mace.train.journal import Journal
from mace.train.trainer import Trainer

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, config: MaceConfig, load: Callable[[], ModelBundle] | None = None) -> None:
        self.config = config
        self._load = load or (lambda: load_model(config.model, config.cache_dir))
        self.engine: Engine | None = None
        # One OS thread loads the model and then runs the engine: all torch work stays on it.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mace-engine")
        self.journal: Journal | None = None
        self.load_error: str | None = None
        self.journal_error: str | None = None
        self.metrics = ServerMetrics(self.stats)
        self.served_model_name = config.server.served_model_name or config.model.name
        self.is_draining = False
        self.num_in_flight = 0  # HTTP API requests and websocket conversations being answered
        self.num_generations = 0  # of those, the ones generating (running or waiting in the engine)
        self._idle = asyncio.Event()
        self._idle.set()
        self.sockets: set[web.WebSocketResponse] = set()

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def ready_engine(self) -> Engine:
        if self.engine is None or not self.engine.is_running:
            reason = self.load_error or "the model is still loading"
            raise ApiError(503, f"not ready: {reason}", code="not_ready", retry_after_s=5)
        return self.engine

    def check_admission(self) -> None:
        if self.is_draining:
            raise ApiError(503, "the server is shutting down; retry on another replica or after the restart",
                           code="shutting_down", retry_after_s=5)

    def admit_generation(self) -> None:
        """Counted on the event loop as requests arrive, so a burst is bounded before the engine sees it."""
        capacity = self.config.engine.max_num_seqs + self.config.server.max_waiting_requests
        if self.num_generations >= capacity:
            raise ApiError(429, f"the server is at capacity ({capacity} generations running or waiting); retry shortly",
                           code="queue_full", retry_after_s=1)
        self.num_generations += 1

    def end_generation(self) -> None:
        self.num_generations -= 1

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
            engine = Engine(bundle, self.config, trainer)
            warmed = await loop.run_in_executor(self._model_thread, lambda: warm_up(engine))
            log.info("engine warmed up", steps=warmed.steps, max_decodes=warmed.max_decodes,
                     latency_margin_s=round(engine.scheduler.latency.error_margin_s, 4),
                     decode_cap=engine.scheduler.decode_cap(), latency_model=engine.scheduler.latency.coefficients())
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load; /ready will answer 503 with the reason")
            return
        engine.start(self._model_thread)
        self.engine = engine
        log.info("engine ready", model=bundle.name, device=str(bundle.device), max_model_len=engine.max_model_len,
                 kv_blocks=engine.blocks.num_blocks)

    def _open_journal(self) -> Journal | None:
        """A data dir that cannot hold the journal (read-only, full, not a directory) costs learning, not serving."""
        try:
            return Journal(self.config.data_dir / "journal.sqlite3", held_out_every(self.config.train.heldout_every))
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
