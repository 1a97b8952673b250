"""Intake: journaled samples become training samples (tensor-free).

`SampleReader` reads each sample from the journal once, past the cursor, and tokenizes it once; the
held-out choice (per fact, train/journal.py) is made when the journal stores it. Each lineage (one tenant's
learning, train/lineage.py) has its own `Intake`: once a sample's score (its loss under that
lineage's serving version, a forward pass the trainer queues) is in, `accept` files it: the held-out
slice for the publish gate, or the replay buffer. A restart, or a lineage brought back from disk,
rebuilds both from the journal's recent window (`resume`), as a trainer that never stopped would hold
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mace.config import TrainConfig
from mace.train.drift import DriftSignal
from mace.train.journal import Journal, StoredSample
from mace.train.replay import ReplayBuffer, TrainSample, supersedes


@dataclass(frozen=True)
class NewTrainSample:
    """A sample read past the cursor, waiting for its score."""

    sample: TrainSample
    held_out: bool


@dataclass(frozen=True)
class GateSlice:
    samples: list[TrainSample]  # oldest first
    held_out: bool  # False: samples the learner trains on (no held-out sample yet)
    weights: list[float] | None = None  # each sample's, besides recency (None: all alike)


class SampleReader:
    """The journal past the cursor, tokenized, with each sample's tenant (engine thread; `window` and
    `tokenize` also on the thread that brings a lineage back)."""

    def __init__(self, tokenizer: Any, journal: Journal, config: TrainConfig) -> None:
        self.tokenizer = tokenizer
        self.journal = journal
        self.config = config
        self.cursor = 0  # the highest journal id read

    def start(self) -> None:
        """Read from what is journaled from now on: samples already there come back through `window`."""
        self.cursor = self.journal.last_id()

    def read_new(self) -> list[tuple[str, NewTrainSample]]:
        """Samples journaled since the last call, tokenized, with their tenant."""
        found = []
        while stored := self.journal.since(self.cursor):
            found += [(row.tenant, NewTrainSample(self.sample(row), row.held_out)) for row in stored]
            self.cursor = stored[-1].sample_id
        return found

    def window(self, tenant: str | None) -> list[tuple[StoredSample, TrainSample]]:
        """`tenant`'s recent window (None: everyone's), tokenized."""
        rows = self.journal.window(self.config.replay_window, self.config.heldout_size, tenant)
        return [(row, self.sample(row)) for row in rows]

    def sample(self, row: StoredSample) -> TrainSample:
        sample = self._tokenize(row.sample_id, row.prompt, row.completion, row.created_at, row.weight)
        sample.num_trained = row.num_trained
        return sample

    def _tokenize(self, sample_id: int, prompt: str, completion: str, created_at: float, weight: float) -> TrainSample:
        max_tokens = self.config.max_sample_tokens
        answer_ids = [*self.tokenizer.encode(completion, add_special_tokens=False), self.tokenizer.eos_token_id]
        answer_ids = answer_ids[: max_tokens - 1]
        # An over-long sample loses the start of its prompt, never its answer (the part that is learned).
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(max_tokens - len(answer_ids)) :]
        return TrainSample(sample_id, prompt_ids + answer_ids, len(prompt_ids), created_at, weight)


class Intake:
    """One lineage's samples: the held-out slice and the replay buffer, and the drift their scores feed."""

    def __init__(self, config: TrainConfig, replay: ReplayBuffer, drift: DriftSignal) -> None:
        self.config = config
        self.replay = replay
        self.drift = drift
        self.heldout: list[TrainSample] = []  # the publish gate's slice, oldest first
        self.num_samples_read = 0  # since the start (periodic counts its rounds by it)
        self._unscored: list[TrainSample] = []  # training samples a restart found never scored

    def take_unscored(self) -> list[NewTrainSample]:
        """Training samples `resume` found never scored (acknowledged, then a crash): scored first."""
        found = [NewTrainSample(sample, held_out=False) for sample in self._unscored]
        self._unscored = []
        return found

    def accept(self, sample: TrainSample, held_out: bool, loss: float) -> None:
        """File a scored sample; its loss under the version users are served now is its value."""
        sample.loss = loss
        self.drift.observe(sample.loss)
        # The gate must not judge a version on an answer the user has since corrected (ReplayBuffer.add).
        self.heldout = [older for older in self.heldout
                        if not supersedes(sample, older) and older.sample_id != sample.sample_id]
        if held_out:
            self.heldout = [*self.heldout[-self.config.heldout_size :], sample]
            self.replay.drop_superseded(sample)
        elif sample.num_trained == 0 or len(self.replay) < self.config.replay_window:
            self.replay.add(sample)

    def gate_slice(self) -> GateSlice:
        """What the publish gate judges a candidate on: the held-out slice together with the newest
        training samples, in arrival order, or, until the first sample is held out, the newest training
        samples alone. A user who sent one correction is then served it once the learner fits it.

        The held-out slice holds only repeats of answers already taught (train/journal.py), so it says
        whether a candidate still answers what users taught before; the newest training samples say
        whether it answers what they taught last, the drift the learner is there to follow. On a
        drifting trace the held-out slice alone held back every candidate of the last phase (their
        losses on older users' facts rose as they learned the new ones) and the server answered the
        old facts all phase long (docs/results/train/compare.md). Half the slice is each, so the gate
        weighs the two by recency.

        A held-out sample whose very question the learner is taught (a training sample in the window
        answers it) weighs fully; the others (their training samples have left the window) weigh
        `heldout_untaught_weight`: their loss moves by chance as training teaches other answers."""
        size = self.config.heldout_size
        if not self.heldout:
            return GateSlice(self.replay.newest(size), held_out=False)
        num_held_out = max(1, size // 2)  # a slice of one is its newest held-out sample
        untaught = self.config.heldout_untaught_weight
        held_out = [(sample, 1.0 if self.replay.teaches(sample.prompt_key) else untaught)
                    for sample in self.heldout[len(self.heldout) - num_held_out :]]
        newest = [(sample, 1.0) for sample in self.replay.newest(size - num_held_out)]
        both = sorted(held_out + newest, key=lambda pair: pair[0].sample_id)
        return GateSlice([sample for sample, _ in both], held_out=True, weights=[weight for _, weight in both])

    def resume(self, window: list[tuple[StoredSample, TrainSample]]) -> None:
        """Rebuild replay and the held-out slice from the lineage's recent window (`SampleReader.window`),
        as a trainer that never stopped would hold them. Samples trained before keep their stored loss,
        so only those never trained (acknowledged, then a crash) cost a scoring pass (`take_unscored`);
        held-out samples need none (the publish gate measures its own losses).

        A journal of any length costs the same: older samples had left the windows anyway.
        """
        newest = {sample.prompt_key: sample for _, sample in window}
        for row, sample in window:
            if supersedes(newest[sample.prompt_key], sample):
                continue  # the user answered this prompt differently later
            if row.held_out:
                self.accept(sample, held_out=True, loss=math.nan)
            elif row.loss is None:
                self._unscored.append(sample)
            else:
                self.accept(sample, held_out=False, loss=row.loss)
