"""Device streams: inference kernels on a high-priority CUDA stream, training on a low-priority one.

Per step the engine thread launches the inference forward, then the training stages, then waits
for the inference stream alone (sampling reads its tokens); the training kernels fill the gaps
decode leaves and may run on into the next step. The two streams share one piece of state that
matters: adapter weights. A publish copies the learner into a serving version on the training
stream, so before the next inference launch the inference stream waits for the training stream
(`publish_fence`). Work done on the default stream (model loading, an operator loading a version
from disk) is ordered before every launch on either stream.

On CPU (or with overlap off, to measure what it buys) both contexts do nothing: the same calls run
one after the other on the engine thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StreamManager:
    def __init__(self, device: torch.device, overlap: bool = True) -> None:
        self.device = device
        self.is_overlapping = overlap and device.type == "cuda"
        self._inference: torch.cuda.Stream | None = None
        self._training: torch.cuda.Stream | None = None
        if self.is_overlapping:
            # A static method the stubs type as an instance one. Numerically lower is more urgent.
            lowest, highest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
            self._inference = torch.cuda.Stream(device, priority=highest)  # type: ignore[no-untyped-call]
            self._training = torch.cuda.Stream(device, priority=lowest)  # type: ignore[no-untyped-call]

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Launch inference kernels (the step's forward, sampling) on the high-priority stream."""
        with self._on(self._inference):
            yield

    @contextmanager
    def training(self) -> Iterator[None]:
        """Launch training kernels (stages, optimizer steps, publishes) on the low-priority stream."""
        with self._on(self._training):
            yield

    def publish_fence(self) -> None:
        """Order everything the training stream launched so far before the next inference launch."""
        if self._inference is not None and self._training is not None:
            self._inference.wait_stream(self._training)

    def synchronize(self) -> None:
        """Wait for both streams (shutdown, checkpoints, benchmarks)."""
        for stream in (self._inference, self._training):
            if stream is not None:
                stream.synchronize()

    @contextmanager
    def _on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(stream):
            yield
