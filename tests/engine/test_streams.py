"""The stream manager's CPU path, and the GPU co-serving check's script in a CPU smoke run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from mace.engine.streams import StreamManager
from tests.conftest import benchmark_module


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


def test_gpu_coserve_script_runs_every_section_on_cpu(tmp_path: Path) -> None:
    module = benchmark_module("gpu_coserve")
    data = module.main(["--device", "cpu", "--sizes", "tiny", "--dtype", "float32", "--batches", "2",
                        "--prompt-tokens", "8", "--sample-tokens", "32", "--steps", "12", "--warmup", "4",
                        "--kv-gib", "1", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text())["coserve"] == data["coserve"]
    assert [row["batch"] for row in data["decode"]] == [2]
    assert data["decode"][0]["eager_tok_s"] > 0 and data["decode"][0]["graph_steps"] == 0  # no CUDA: no graphs
    modes = {row["name"]: row for row in data["coserve"]}
    assert list(modes) == ["off", "overlapped @1.15x", "serialized @1.15x", "training-alone"]  # no green on a CPU
    assert modes["off"]["train_tok_s"] == 0 and modes["off"]["decode_tok_s"] > 0
    assert modes["training-alone"]["decode_tok_s"] == 0 and modes["training-alone"]["train_tok_s"] > 0
    assert not data["skipped"]
    profile = data["profile"]
    assert profile["wall_ms_per_step"] > 0 and profile["device_busy_ms_per_step"] > 0 and profile["top"]


def test_cpu_training_work_runs_on_its_own_thread_beside_the_body_and_ends_with_it() -> None:
    streams = StreamManager(torch.device("cpu"), train_thread=True)
    if not streams.is_threaded:  # one core: the work runs after the body on this thread
        assert torch.get_num_threads() < 2
    started, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def work() -> None:
        seen["thread"] = threading.get_ident()
        started.set()
        release.wait(timeout=10)
        seen["done"] = True

    try:
        with streams.beside(work):
            if streams.is_threaded:
                assert started.wait(timeout=10), "the training work did not start beside the body"
                assert "done" not in seen
                release.set()
            else:
                release.set()
        assert seen["done"] is True  # the step ends with its training done
        assert (seen["thread"] != threading.get_ident()) == streams.is_threaded
    finally:
        streams.close()


def test_a_failure_of_the_training_work_reaches_the_step() -> None:
    streams = StreamManager(torch.device("cpu"), train_thread=True)

    def work() -> None:
        raise RuntimeError("stage failed")

    try:
        with pytest.raises(RuntimeError, match="stage failed"), streams.beside(work):
            pass
    finally:
        streams.close()


def test_a_thread_made_during_an_overlapped_step_still_claims_every_core() -> None:
    """PyTorch hands the last count set by any thread to threads started later: one made while the
    engine thread holds its share of a step (an executor's new worker, a restarted engine) begins with it."""
    streams = StreamManager(torch.device("cpu"), train_thread=True, num_threads=2)
    assert streams.is_threaded
    counts: dict[str, int] = {}

    def later_engine_thread() -> None:
        counts["began"] = torch.get_num_threads()
        streams.claim_cores()
        counts["claimed"] = torch.get_num_threads()

    try:
        with streams.beside(lambda: None):
            thread = threading.Thread(target=later_engine_thread)
            thread.start()
            thread.join(timeout=10)
        assert counts["began"] == 1  # the leak this guards against
        assert counts["claimed"] == 2
    finally:
        streams.close()
