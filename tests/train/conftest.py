from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mace.config import TrainConfig
from mace.model.loader import ModelBundle
from mace.train.journal import Journal
from mace.train.trainer import Trainer
from tests.conftest import tiny_config


@pytest.fixture
def trainer(tmp_path: Path, tiny_bundle: ModelBundle) -> Iterator[Trainer]:
    """A `mace` trainer on the tiny model, outside an engine."""
    yield from _trainer(tmp_path, tiny_bundle, {"policy": "mace"})


@pytest.fixture
def guarded_trainer(tmp_path: Path, tiny_bundle: ModelBundle) -> Iterator[Trainer]:
    """The same with the retention guard at the shipped value (configs/tiny.toml turns it off)."""
    yield from _trainer(tmp_path, tiny_bundle, {"policy": "mace", "retention_guard": TrainConfig().retention_guard})


def _trainer(tmp_path: Path, tiny_bundle: ModelBundle, train: dict[str, object]) -> Iterator[Trainer]:
    config = tiny_config(tmp_path, train=train)
    journal = Journal(tmp_path / "journal.sqlite3", config.train.heldout_every)
    trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
    try:
        yield trainer
    finally:
        trainer.close()
        trainer.learner.peft_model.unload()
        journal.close()
