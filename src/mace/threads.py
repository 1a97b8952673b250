"""How the process's CPU cores are shared between the engine's forward and the training thread.

PyTorch's `set_num_threads` also sets the count that threads started later begin with, so the
training thread's share would leak into every thread made after it (a server restarted in the same
process, a new executor worker). The count the engine claims is therefore read once, when mace is
imported, before any thread changes it.
"""

from __future__ import annotations

import torch

PROCESS_THREADS = torch.get_num_threads()


def engine_threads(configured: int = 0) -> int:
    """The torch threads the engine's forward runs on when it has the cores to itself."""
    return configured or PROCESS_THREADS


def split(cores: int) -> tuple[int, int]:
    """(forward, training) threads of a step that trains beside its forward: training's larger
    matmuls get half, a small model's decode (bound by reading the weights) the rest."""
    return cores - cores // 2, cores // 2
