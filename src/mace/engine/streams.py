"""Device streams: inference kernels on a high-priority CUDA stream, training on a low-priority one.

Per step the engine thread launches the inference forward, then the training stages, then waits
for the inference stream alone (sampling reads its tokens); the training kernels fill the gaps
decode leaves and may run on into the next step. The two streams share one piece of state that
matters: adapter weights. A publish copies the learner into a serving version on the training
stream, so before the next inference launch the inference stream waits for the training stream
(`publish_fence`). Work done on the default stream (model loading, an operator loading a version
from disk) is ordered before every launch on either stream.

On a CPU with two or more cores (and `engine.train_thread`, on by default), the training stages run on a thread of
their own, beside the serving forward, each with its share of the cores (`beside`): a decode step of
a small model is bound by reading the weights and gains little from a second core, which training's
larger matmuls then use (docs/results/serving.md, "Training beside decode on a CPU"). The step ends
when both are done, so the optimizer step and publishes still happen at the step boundary, as on
CUDA. The two threads share the model; each chooses its own adapter (train/adapter_switch.py).
Otherwise (one core, or `train_thread = false` to measure what it buys) the same calls run one
after the other on the engine thread. How the cores are split, and why the engine thread claims its
count at every step, is in `mace/threads.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from mace import threads

# A green context lives as long as the process: memory the caching allocator handed out on its streams
# (training's activations, AdamW state) outlives any one engine, and a destroyed context fails it.
_GREEN_CONTEXTS: dict[tuple[int, int], Any] = {}


class StreamManager:
    def __init__(self, device: torch.device, overlap: bool = True, train_thread: bool = False,
                 num_threads: int = 0) -> None:
        self.device = device
        self.is_overlapping = overlap and device.type == "cuda"
        self._inference: torch.cuda.Stream | None = None
        self._training: torch.cuda.Stream | None = None
        if self.is_overlapping:
            # A static method the stubs type as an instance one. Numerically lower is more urgent.
            lowest, highest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
            self._inference = torch.cuda.Stream(device, priority=highest)  # type: ignore[no-untyped-call]
            self._training = torch.cuda.Stream(device, priority=lowest)  # type: ignore[no-untyped-call]
        cores = threads.engine_threads(num_threads)
        self.is_threaded = train_thread and device.type == "cpu" and cores >= 2
        self._cores = cores
        self._forward_threads, self._training_threads = threads.split(cores)
        self._trainer_thread: ThreadPoolExecutor | None = None  # made at the first training work

    @property
    def beside_share(self) -> float:
        """The training thread's share of the cores (0: training runs after the forward)."""
        return self._training_threads / self._cores if self.is_threaded else 0.0

    def claim_cores(self) -> None:
        """Give the calling thread (the engine's) every core, whatever count it began with."""
        if torch.get_num_threads() != self._cores:
            torch.set_num_threads(self._cores)

    @contextmanager
    def beside(self, work: Callable[[], None] | None, has_body: bool = True) -> Iterator[None]:
        """The body (the serving forward) and `work` (training stages) together: on a CPU on two threads,
        joined at the end; else (or with no forward to run beside: all cores to training) the body,
        then `work` launched on the training stream."""
        if work is None:
            yield
            return
        if not (self.is_threaded and has_body):
            yield
            with self.training():
                work()
            return
        if self._trainer_thread is None:
            self._trainer_thread = ThreadPoolExecutor(
                1, thread_name_prefix="mace-train", initializer=torch.set_num_threads,
                initargs=(self._training_threads,))
        pending = self._trainer_thread.submit(work)
        torch.set_num_threads(self._forward_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self._cores)
            error = pending.exception()  # waits: the step ends with its training done
        if error is not None:
            raise error

    def partition_training(self, sm_fraction: float) -> int:
        """Run training on a CUDA green context holding `sm_fraction` of the SMs (the rest stay free for
        inference) instead of on the low-priority stream alone; returns the SMs given. Raises where the
        installed torch or driver has no green contexts."""
        if not self.is_overlapping:
            raise RuntimeError("SM partitioning needs CUDA with overlapped streams")
        from torch.cuda import green_contexts

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        num_sms = max(1, int(torch.cuda.get_device_properties(index).multi_processor_count * sm_fraction))
        key = (index, num_sms)
        if key not in _GREEN_CONTEXTS:
            green: Any = green_contexts.GreenContext  # its API moved between torch releases
            make = getattr(green, "create", green)  # `create` until 2.13, the constructor after
            _GREEN_CONTEXTS[key] = make(num_sms=num_sms, device_id=index)
        self._training = _GREEN_CONTEXTS[key].Stream()
        return num_sms

    def close(self) -> None:
        """Stop the training thread (after the engine loop has stopped)."""
        if self._trainer_thread is not None:
            self._trainer_thread.shutdown(wait=True)
            self._trainer_thread = None

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
