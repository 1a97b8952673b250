"""A trainer that starts on an existing journal resumes where the last one stopped: it rebuilds replay
and the held-out slice from the journal's recent window (stored scores reused), keeps the cursor, and
scores only what was never trained, whatever the journal's length."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mace.model.loader import ModelBundle
from mace.train.journal import Journal, NewSample
from mace.train.replay import TrainSample
from mace.train.trainer import Trainer
from mace.train.work import TrainWork
from tests.conftest import tiny_config

REPLAY_WINDOW = 8
HELDOUT_SIZE = 3


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path / "journal.sqlite3", 5)
    yield journal
    journal.close()


@pytest.fixture
def open_trainer(tmp_path: Path, tiny_bundle: ModelBundle, journal: Journal) -> Iterator[Callable[[], Trainer]]:
    """Builds trainers on `journal` (a restart is a second one), closed at the end."""
    config = tiny_config(tmp_path, train={"policy": "mace", "replay_window": REPLAY_WINDOW,
                                          "heldout_size": HELDOUT_SIZE, "heldout_every": 5})
    opened: list[Trainer] = []

    def build() -> Trainer:
        trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
        opened.append(trainer)
        return trainer

    yield build
    for trainer in opened:
        trainer.close()
    if opened:
        opened[0].learner.peft_model.unload()


def _run_upkeep(trainer: Trainer) -> None:
    """Score what is queued, a stage per step, as the engine would."""
    while stages := trainer.upkeep_stages():
        trainer.run_work(TrainWork((stages[0],)))
        trainer.after_step()


def _replayed(trainer: Trainer) -> list[TrainSample]:
    chunk = trainer.replay.pick(max_tokens=100_000, now_s=0.0, max_samples=1_000)
    return chunk.samples if chunk is not None else []


def _append(journal: Journal, count: int, start: int = 0) -> list[int]:
    return journal.append([NewSample(f"question {start + i}?", f"answer {start + i}") for i in range(count)])


def _training_ids(journal: Journal, ids: list[int]) -> list[int]:
    held_out = {s.sample_id for s in journal.since(0, 100_000) if s.held_out}
    return [i for i in ids if i not in held_out]


def test_trained_samples_come_back_with_their_stored_loss_and_nothing_is_rescored(
    journal: Journal, open_trainer: Callable[[], Trainer]
) -> None:
    ids = _append(journal, 6)
    trained = _training_ids(journal, ids)
    journal.mark_trained(trained, cursor=ids[-1], losses=[0.5 + i for i in range(len(trained))])
    trainer = open_trainer()
    assert trainer.num_trainable == len(trained)
    assert sorted(s.loss for s in _replayed(trainer)) == \
        [0.5 + i for i in range(len(trained))]
    assert [s.sample_id for s in trainer.intake.heldout] == [i for i in ids if i not in trained]
    assert trainer.ingest() == 0 and not trainer.upkeep_stages()  # no scoring pass, no re-read


def test_samples_acknowledged_but_never_trained_are_scored_at_the_first_ingest(
    journal: Journal, open_trainer: Callable[[], Trainer]
) -> None:
    ids = _append(journal, 4)
    trainer = open_trainer()
    assert trainer.num_trainable == 0  # not ranked before they are scored under the serving version
    pending = _training_ids(journal, ids)
    assert trainer.ingest() == len(pending)
    assert trainer.upkeep_stages()
    _run_upkeep(trainer)
    assert trainer.num_trainable == len(pending)
    assert all(math.isfinite(s.loss) for s in _replayed(trainer))


def test_only_the_recent_window_is_read_and_the_cursor_follows_the_journal(
    journal: Journal, open_trainer: Callable[[], Trainer]
) -> None:
    ids = _append(journal, 100) + _append(journal, 100)  # every answer taught twice: repeats are held out
    trained = _training_ids(journal, ids)
    journal.mark_trained(trained, cursor=ids[-1], losses=[1.0] * len(trained))
    trainer = open_trainer()
    assert trainer.num_trainable == REPLAY_WINDOW
    assert min(s.sample_id for s in _replayed(trainer)) > ids[-20]
    assert len(trainer.intake.heldout) == HELDOUT_SIZE
    assert trainer.ingest() == 0
    newer = _append(journal, 2, start=200)
    assert trainer.ingest() == len(newer)  # only what came after the cursor


def test_a_corrected_answer_found_at_restart_stays_superseded(
    journal: Journal, open_trainer: Callable[[], Trainer]
) -> None:
    _, other, new = journal.append([NewSample("my city?", "Oslo"), NewSample("my pet?", "cat"),
                                      NewSample("my city?", "Cairo")])
    journal.mark_trained([new], cursor=new, losses=[0.3])  # the old answer was never trained
    trainer = open_trainer()
    assert trainer.num_trainable == 1  # the newest answer, with its stored score
    assert trainer.ingest() == 1  # the other prompt is scored; the superseded answer is not
    _run_upkeep(trainer)
    kept = {s.sample_id for s in _replayed(trainer)}
    assert kept == {other, new}
