"""The trainer's queued forward-only work: a loss pass in layer stages, and a publish gate's gathered losses."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mace.train.layered import LayeredLoss
from mace.train.replay import TrainSample
from mace.train.work import TrainStage


@dataclass
class Upkeep:
    """Forward-only work in layer stages: a sample's loss under an adapter, then what is done with it.

    The pass is built at its first stage, so a score is taken under the version serving by then.
    """

    stages: list[TrainStage]  # those left
    begin: Callable[[], LayeredLoss] | None  # None: bookkeeping only (`finish` gets NaN)
    finish: Callable[[float], None]
    loss_pass: LayeredLoss | None = None

    def run_next(self) -> None:
        self.stages.pop(0)
        if self.begin is not None:
            if self.loss_pass is None:
                self.loss_pass = self.begin()
            self.loss_pass.run_next()

    def complete(self) -> None:
        """Hand the loss on; at a step boundary, since reading it waits for the device."""
        self.finish(self.loss_pass.loss if self.loss_pass is not None else math.nan)


@dataclass
class PublishGate:
    """Held-out losses of the learner and of the serving version, gathered one sample per stage."""

    samples: list[TrainSample]  # oldest first
    serving_version: int
    learner_losses: dict[int, float] = field(default_factory=dict)  # by sample id
