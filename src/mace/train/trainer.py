"""Continual fine-tuning on the engine thread: intake scoring, sample choice, micro-steps, the
publish gate, adapter versions and checkpoints. The scheduler asks it for training chunks; the
runner executes them; the engine calls `after_step` at each step boundary."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from mace.config import MaceConfig
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.journal import Journal
from mace.train.learner import Learner
from mace.train.policy import RetrainPolicy, make_policy
from mace.train.replay import DriftSignal, ReplayBuffer, TrainChunk, TrainSample

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainStats:
    policy: str
    active_version: int
    num_optimizer_steps: int
    num_skipped_steps: int
    train_tokens_total: int
    train_seconds_total: float
    learner_loss: float
    serving_heldout_loss: float
    learner_heldout_loss: float
    drift: float
    seconds_since_publish: float
    num_trainable: int


class Trainer:
    def __init__(self, causal_lm: Any, tokenizer: Any, journal: Journal, config: MaceConfig) -> None:
        self.config = config.train
        self.tokenizer = tokenizer
        self.journal = journal
        self.policy: RetrainPolicy = make_policy(config.train)
        self.learner = Learner(causal_lm, config.train)
        self.store = AdapterStore(config.data_dir / "adapters")
        self.checkpoint_path = config.data_dir / "checkpoints" / "learner.pt"
        self.replay = ReplayBuffer(config.train.replay_window, config.train.freshness_half_life_s)
        self.heldout: list[TrainSample] = []
        self.drift = DriftSignal()
        self.active_version = 0
        self.publishing_held = False  # an operator chose a version by hand: keep it until they choose the newest
        self.num_new_samples = 0
        self.train_tokens_total = 0
        self.train_seconds_total = 0.0
        self.learner_loss = math.nan
        self.serving_heldout_loss = math.nan
        self.learner_heldout_loss = math.nan
        self.last_publish_s = time.monotonic()
        self._last_checkpoint_s = time.monotonic()
        self._last_seen_id = 0
        self._restore()

    # ---- what the scheduler reads ----

    @property
    def num_trainable(self) -> int:
        return len(self.replay)

    def drift_ratio(self) -> float:
        return self.drift.ratio

    def pick(self, max_tokens: int, at_least_one: bool = False) -> TrainChunk | None:
        budget = min(max_tokens, self.config.idle_chunk_tokens)
        return self.replay.pick(budget, time.time(), self.config.batch_size, at_least_one)

    # ---- intake ----

    def ingest(self) -> int:
        """Tokenize and score samples journaled since the last call; returns how many."""
        stored = self.journal.since(self._last_seen_id)
        for row in stored:
            sample = self._tokenize(row.sample_id, row.prompt, row.completion, row.created_at, row.weight)
            sample.num_trained = row.num_trained
            with torch.no_grad():
                sample.loss = self.learner.evaluate([sample], self.active_version)
            self.drift.observe(sample.loss)
            if row.held_out:
                self.heldout = [*self.heldout[-self.config.heldout_size :], sample]
            elif row.num_trained == 0 or len(self.replay) < self.config.replay_window:
                self.replay.add(sample)
            self._last_seen_id = row.sample_id
        self.num_new_samples += len(stored)
        return len(stored)

    def _tokenize(self, sample_id: int, prompt: str, completion: str, created_at: float, weight: float) -> TrainSample:
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = [*self.tokenizer.encode(completion, add_special_tokens=False), self.tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[: self.config.max_sample_tokens]
        return TrainSample(sample_id, ids, len(prompt_ids), created_at, weight)

    # ---- training, on the engine thread ----

    def run_chunk(self, chunk: TrainChunk) -> list[float]:
        started = time.perf_counter()
        losses = self.learner.train_chunk(chunk)
        self.train_seconds_total += time.perf_counter() - started
        self.train_tokens_total += chunk.num_tokens
        return losses

    def after_step(self, chunk: TrainChunk | None, losses: list[float]) -> None:
        if chunk is not None and losses:
            for sample, loss in zip(chunk.samples, losses, strict=True):
                sample.loss = loss if math.isfinite(loss) else sample.loss
                sample.num_trained += 1
            finite = [loss for loss in losses if math.isfinite(loss)]
            if finite:
                self.learner_loss = sum(finite) / len(finite)
            self.journal.mark_trained([s.sample_id for s in chunk.samples], self._last_seen_id)
            if self.learner.batch_ready() and self.learner.optimizer_step():
                self.policy.on_optimizer_step(time.monotonic())
                self._maybe_publish()
        if time.monotonic() - self._last_checkpoint_s > self.config.checkpoint_interval_s:
            self.checkpoint()

    def _maybe_publish(self) -> None:
        heldout = self.heldout[-self.config.heldout_size :]
        since_publish_s = time.monotonic() - self.last_publish_s
        if not heldout or self.publishing_held or since_publish_s < self.config.min_publish_interval_s:
            return
        learner = self.learner.evaluate(heldout, None)
        serving = self.learner.evaluate(heldout, self.active_version)
        self.learner_heldout_loss, self.serving_heldout_loss = learner, serving
        if not (math.isfinite(learner) and math.isfinite(serving)):
            return
        better = learner < serving * (1.0 - self.config.publish_margin)
        stale = time.monotonic() - self.last_publish_s > self.config.max_staleness_s and learner <= serving
        if better or stale:
            self.publish(serving, learner, "better on held-out" if better else "stale, no worse")

    def publish(self, serving_loss: float, learner_loss: float, reason: str) -> int:
        version = self.store.next_version()
        self.learner.publish(version)
        meta = AdapterVersion(version, self.store.now(), serving_loss, learner_loss,
                              self.learner.num_optimizer_steps, reason)
        self.store.write(meta, lambda directory: self.learner.save_version(version, directory))
        self.store.set_active(version)
        self.active_version = version
        self.last_publish_s = time.monotonic()
        self.drift.on_publish(serving_loss, learner_loss)
        self.num_new_samples = 0
        log.info("adapter published", version=version, serving_loss=serving_loss, learner_loss=learner_loss,
                 reason=reason)
        return version

    def activate(self, version: int) -> None:
        if version != 0 and version not in self.learner.loaded_versions:
            self.learner.load_version(version, str(self.store.path(version)))
        self.store.set_active(version)
        self.active_version = version
        self.publishing_held = version != max((v.version for v in self.store.versions()), default=0)

    def release_versions(self, in_use: set[int]) -> None:
        """Unload old versions no request is pinned to, keeping the newest few loaded."""
        keep = sorted(self.learner.loaded_versions)[-self.config.max_versions_loaded :]
        for version in list(self.learner.loaded_versions):
            if version not in keep and version not in in_use and version != self.active_version:
                self.learner.unload_version(version)

    # ---- checkpoints ----

    def checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({**self.learner.state_dict(), "cursor": self._last_seen_id}, tmp)
        os.replace(tmp, self.checkpoint_path)
        self._last_checkpoint_s = time.monotonic()

    def _restore(self) -> None:
        active = self.store.active()
        if active and self.store.exists(active):
            self.activate(active)
            self.last_publish_s = time.monotonic()
        if self.checkpoint_path.is_file():
            state = torch.load(self.checkpoint_path, weights_only=True)
            self.learner.load_state_dict(state)

    def stats(self) -> TrainStats:
        return TrainStats(
            policy=self.policy.name, active_version=self.active_version,
            num_optimizer_steps=self.learner.num_optimizer_steps, num_skipped_steps=self.learner.num_skipped_steps,
            train_tokens_total=self.train_tokens_total, train_seconds_total=self.train_seconds_total,
            learner_loss=self.learner_loss, serving_heldout_loss=self.serving_heldout_loss,
            learner_heldout_loss=self.learner_heldout_loss, drift=self.drift.ratio,
            seconds_since_publish=time.monotonic() - self.last_publish_s, num_trainable=self.num_trainable,
        )
