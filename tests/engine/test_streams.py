"""The stream manager's CPU path, and the GPU co-serving check's script in a CPU smoke run."""

from __future__ import annotations

import importlib.util
import sys

import torch

from mace.engine.streams import StreamManager
from tests.conftest import ROOT


def test_cpu_streams_run_work_in_place_and_in_order() -> None:
    streams = StreamManager(torch.device("cpu"))
    assert not streams.is_overlapping
    x = torch.ones(4)
    with streams.inference():
        y = x * 2
    with streams.training():
        z = y + 1
    streams.publish_fence()
    streams.synchronize()
    assert z.tolist() == [3.0] * 4


def test_gpu_coserve_script_runs_every_mode_on_cpu() -> None:
    spec = importlib.util.spec_from_file_location("gpu_coserve", ROOT / "benchmarks" / "gpu_coserve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_coserve"] = module
    spec.loader.exec_module(module)
    results = module.main(["--device", "cpu", "--size", "tiny", "--dtype", "float32", "--batch", "2",
                           "--prompt-tokens", "8", "--sample-tokens", "32", "--steps", "12", "--warmup", "4",
                           "--kv-gib", "1"])
    assert [r.name for r in results] == ["off", "overlapped", "serialized"]
    assert all(len(r.tpot_ms) == 12 and r.decode_tok_s > 0 for r in results)
    assert results[0].train_tok_s == 0
