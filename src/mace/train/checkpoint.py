"""A lineage's learner checkpoint: its LoRA weights, AdamW moments and the journal cursor, in one file.

The state is copied to the CPU on the engine thread (the optimizer's state dict holds its live
tensors, which the next optimizer step changes in place) and written by the writer thread
(train/writer.py) to a temporary file renamed into place, so a crash keeps the previous one whole.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from mace.train.learner import LearnerState
from mace.train.writer import DiskWriter


def cpu_copy(value: Any) -> Any:
    """`value` with every tensor in it (nested in dicts, lists and tuples) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(item) for item in value)
    return value


class Checkpoints:
    def __init__(self, path: Path, writer: DiskWriter) -> None:
        self.path = path
        self._writer = writer
        self.last_saved_s = time.monotonic()

    def save(self, learner: LearnerState, cursor: int) -> None:
        """Queue a checkpoint of `learner` (a copy the caller will not change: `Learner.capture`, or a
        parked lineage's state, copied here to the CPU)."""
        state = {**cpu_copy(learner.to_dict()), "cursor": cursor}
        self.last_saved_s = time.monotonic()
        self._writer.submit(lambda: self._write(state))

    def _write(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def read(self, parameter_names: list[str]) -> LearnerState | None:
        """The saved state (any thread: disk only), or None without a checkpoint."""
        if not self.path.is_file():
            return None
        return LearnerState.from_dict(torch.load(self.path, weights_only=True), parameter_names)
