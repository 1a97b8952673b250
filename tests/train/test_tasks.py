"""The trainer runs exactly the stages a plan names, matched to their tasks by id."""

from __future__ import annotations

from mace.train.journal import NewSample
from mace.train.trainer import Trainer
from mace.train.work import TrainWork


def test_stages_name_their_task_and_run_only_as_its_next_stage(trainer: Trainer) -> None:
    trainer.journal.append([NewSample(f"question {i}?", f"answer {i}") for i in range(2)])
    assert trainer.ingest() == 2
    stages = trainer.upkeep_stages()
    first, second = stages[0].task_id, stages[-1].task_id
    assert first != second and [s.index for s in stages if s.task_id == first] == list(range(len(stages) // 2))
    trainer.run_work(TrainWork((stages[1],)))  # not the task's next stage: refused, nothing runs
    assert trainer.upkeep_stages() == stages
    for stage in stages:
        trainer.run_work(TrainWork((stage,)))
    assert not trainer.upkeep_stages()
    trainer.after_step()  # the scores are read at the step boundary
    assert trainer.num_trainable + len(trainer.intake.heldout) == 2
