"""The trainer runs exactly the stages a plan names, matched to their tasks by id; loss requests share
a pass when they can."""

from __future__ import annotations

from typing import Any

from mace.train.journal import NewSample
from mace.train.layered import MAX_PASS_TOKENS, head_parts
from mace.train.learner import BASE, CANDIDATE
from mace.train.replay import TrainSample
from mace.train.tasks import LossPurpose, LossRequest, TaskQueue
from mace.train.trainer import Trainer
from mace.train.work import TrainWork


def test_stages_name_their_task_and_run_only_as_its_next_stage(trainer: Trainer) -> None:
    trainer.journal.append([NewSample(f"question {i}?", f"answer {i}") for i in range(2)])
    assert trainer.ingest() == 2
    stages = trainer.upkeep_stages()
    assert len({s.task_id for s in stages}) == 1, "two scores under the same version share one pass"
    assert [s.index for s in stages] == list(range(len(stages)))
    trainer.run_work(TrainWork((stages[1],)))  # not the task's next stage: refused, nothing runs
    assert trainer.upkeep_stages() == stages
    trainer.run_work(TrainWork((stages[0],)))
    trainer.journal.append([NewSample("question 2?", "answer 2")])
    assert trainer.ingest() == 1
    later = trainer.upkeep_stages()
    assert later[: len(stages) - 1] == stages[1:], "a pass that has started takes no one else"
    assert len({s.task_id for s in later}) == 2
    for stage in later:
        trainer.run_work(TrainWork((stage,)))
    assert not trainer.upkeep_stages()
    trainer.after_step()  # the scores are read at the step boundary
    assert trainer.num_trainable + len(trainer.intake.heldout) == 3


def test_loss_requests_join_a_pass_of_the_same_adapter_and_lineage_within_its_size() -> None:
    def begin(request: LossRequest, samples: list[TrainSample]) -> Any:
        raise AssertionError("nothing runs here")

    def request(sample_id: int, adapter: str | None, tenant: str = "", num_tokens: int = 40,
                tokens_of: int | None = None) -> LossRequest:
        sample = TrainSample(sample_id, [tokens_of or sample_id] * num_tokens, 10, 0.0)
        return LossRequest(sample, LossPurpose.CANDIDATE, adapter, tenant=tenant)

    queue = TaskQueue(num_layers=2, begin_loss=begin)
    for item in [request(1, CANDIDATE), request(2, BASE), request(3, CANDIDATE), request(4, CANDIDATE, "alice"),
                 request(5, None), request(6, None), request(7, BASE, num_tokens=MAX_PASS_TOKENS)]:
        queue.queue_loss(item)
    tasks = list(queue._upkeep)
    assert [[r.sample.sample_id for r in task.requests] for task in tasks] == [[1, 3], [2], [4], [5, 6], [7]]
    stages = queue.upkeep_stages()
    head = head_parts(60)  # the two samples' 30 answer positions each, in parts
    assert [s.num_tokens for s in stages if s.task_id == tasks[0].task_id] == [80, 80, *head]  # 2 layers, the head
    queue.queue_loss(request(8, CANDIDATE, tokens_of=1))  # sample 1 again: one more request, no more rows
    assert [r.sample.sample_id for r in tasks[0].requests] == [1, 3, 8]
    assert [s.num_tokens for s in queue.upkeep_stages() if s.task_id == tasks[0].task_id] == [80, 80, *head]
