from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mace.model.loader import ModelBundle
from mace.train.intake import held_out_every
from mace.train.journal import Journal
from mace.train.trainer import Trainer
from tests.conftest import tiny_config


@pytest.fixture
def trainer(tmp_path: Path, tiny_bundle: ModelBundle) -> Iterator[Trainer]:
    """A `mace` trainer on the tiny model, outside an engine."""
    config = tiny_config(tmp_path, train={"policy": "mace"})
    journal = Journal(tmp_path / "journal.sqlite3", held_out_every(config.train.heldout_every))
    trainer = Trainer(tiny_bundle.causal_lm, tiny_bundle.tokenizer, journal, config)
    try:
        yield trainer
    finally:
        trainer.close()
        trainer.learner.peft_model.unload()
        journal.close()
