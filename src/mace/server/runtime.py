"""What the HTTP layer holds: the config, the engine once the model has loaded, and the metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

import structlog

from mace.config import MaceConfig
from mace.engine.engine import Engine, EngineStats
from mace.model.loader import ModelBundle, load_model
from mace.server.errors import ApiError
from mace.server.metrics import ServerMetrics
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
        self.metrics = ServerMetrics(self.stats)
        self.served_model_name = config.server.served_model_name or config.model.name

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

    def accepts_model(self, name: str) -> bool:
        return name in (self.served_model_name, self.config.model.name)

    async def start(self) -> None:
        """Load the model off the event loop, so /health answers while it loads."""
        loop = asyncio.get_running_loop()
        try:
            bundle = await loop.run_in_executor(self._model_thread, self._load)
            self.journal = Journal(self.config.data_dir / "journal.sqlite3", self.config.train.heldout_every)
            journal = self.journal
            trainer = None
            if self.config.train.policy != "none":
                trainer = await loop.run_in_executor(
                    self._model_thread, lambda: Trainer(bundle.causal_lm, bundle.tokenizer, journal, self.config)
                )
            engine = Engine(bundle, self.config, trainer)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load; /ready will answer 503 with the reason")
            return
        engine.start(self._model_thread)
        self.engine = engine
        log.info("engine ready", model=bundle.name, device=str(bundle.device), max_model_len=engine.max_model_len,
                 kv_blocks=engine.blocks.num_blocks)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()
