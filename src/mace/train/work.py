"""Training work cut into stages small enough to ride along in one engine iteration (tensor-free).

A micro-step on one sample is not one indivisible chunk: it is the forward of each decoder layer
(activations kept between iterations), the LM head and loss with their backward, then each layer's
backward from the last down. Each stage costs a few milliseconds, so training can fill whatever
latency slack an iteration leaves. Forward-only upkeep (scoring new samples, evaluating the publish
gate) is staged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StageKind(StrEnum):
    SCORE = "score"  # forward only: a new sample's loss under the serving version (its value, the drift)
    EVAL = "eval"  # forward only: a held-out sample under the learner or the serving version (publish gate)
    FORWARD = "forward"  # one decoder layer's forward on the learner, activations kept
    HEAD = "head"  # final norm, LM head and loss on the answer positions, and their backward
    BACKWARD = "backward"  # one decoder layer's backward

    @property
    def is_upkeep(self) -> bool:
        return self in (StageKind.SCORE, StageKind.EVAL)


@dataclass(frozen=True)
class TrainStage:
    kind: StageKind
    num_tokens: int  # tokens the stage processes (answer tokens for HEAD)


@dataclass(frozen=True)
class TrainWork:
    """The stages one iteration runs, in the trainer's order."""

    stages: tuple[TrainStage, ...]

    def num_tokens(self, *kinds: StageKind) -> int:
        return sum(stage.num_tokens for stage in self.stages if stage.kind in kinds)
