"""Training work cut into stages small enough to ride along in one engine iteration (tensor-free).

A micro-step on one sample is not one indivisible chunk: it is the forward of each decoder layer
(activations kept between iterations), the LM head and loss with their backward, then each layer's
backward from the last down. Each stage costs a few milliseconds, so training can fill whatever
latency slack an iteration leaves. Forward-only upkeep (scoring new samples, evaluating the publish
gate) is staged the same way, layer by layer, so that it never needs more slack than a step has.

Every stage names the task it belongs to (`task_id`: one loss pass or one micro-step) and its place
in that task (`index`), so the trainer runs exactly the stages a plan holds and can tell a plan that
does not match its queue from one that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StageKind(StrEnum):
    FORWARD = "forward"  # one decoder layer's forward (activations kept when training)
    HEAD = "head"  # final norm, LM head and loss on the answer positions (and their backward when training)
    BACKWARD = "backward"  # one decoder layer's backward


@dataclass(frozen=True)
class TrainStage:
    kind: StageKind
    num_tokens: int  # tokens the stage processes (answer tokens for HEAD)
    # Forward-only upkeep: scoring a new sample under the serving version (its value, the drift) or
    # evaluating a held-out sample for the publish gate. It runs before training and may use all of
    # a step's slack, whatever the policy's training budget.
    is_upkeep: bool = False
    task_id: int = 0  # the trainer's task (loss pass or micro-step) the stage belongs to
    index: int = 0  # the stage's place in its task, from 0


@dataclass(frozen=True)
class TrainWork:
    """The stages one iteration runs, in the trainer's order."""

    stages: tuple[TrainStage, ...]

    def num_tokens(self, *kinds: StageKind) -> int:
        return sum(stage.num_tokens for stage in self.stages if stage.kind in kinds)
