"""The learner's fast adapter switches and reused version slots give the same outputs as peft's own."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch

from mace.model.loader import ModelBundle
from mace.train.adapters import AdapterStore, AdapterVersion
from mace.train.learner import BASE, Learner, save_adapter
from tests.conftest import tiny_config


def test_uniform_switches_equal_peft_routing(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path).train)
    try:
        torch.manual_seed(0)
        for param in learner._learner_params():
            torch.nn.init.normal_(param, std=0.05)
        learner.publish(1)
        for param in learner._learner_params():  # the learner moves on: v1 and the learner now differ
            torch.nn.init.normal_(param, std=0.05)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        model = learner.peft_model

        def logits() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids).logits  # type: ignore[no-any-return]

        learner_out = logits()
        with model.disable_adapter():
            base_reference = logits()
        with model.base_model._enable_peft_forward_hooks(adapter_names=[learner.adapter_for(1)]):
            v1_reference = logits()
        with learner.serving([BASE] * 6):
            base_out = logits()
        with learner.serving([learner.adapter_for(1)] * 6):
            v1_out = logits()
        torch.testing.assert_close(base_out, base_reference)
        torch.testing.assert_close(v1_out, v1_reference)
        assert not torch.allclose(base_out, v1_out) and not torch.allclose(v1_out, learner_out)
        torch.testing.assert_close(logits(), learner_out)  # the learner is active again afterwards
    finally:
        learner.peft_model.unload()


IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def test_an_adapter_choice_holds_on_its_own_thread_only(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """Serving (base, one version, mixed versions) on one thread leaves another thread's forward, as the
    training stages run beside serving on a CPU, on the learner."""
    learner = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path).train)
    rows = IDS.T  # six one-token rows: the runner's flat batch, one adapter per row

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return learner.peft_model(input_ids=rows).logits  # type: ignore[no-any-return]

    try:
        learner.publish(1)
        _move_learner(learner, seed=1)
        learner_out = forward()
        v1 = learner.adapter_for(1)
        for choice in ([BASE] * 6, [v1] * 6, [BASE, v1] * 3):
            beside: dict[str, torch.Tensor] = {}
            with learner.serving(choice):
                served = forward()
                thread = threading.Thread(target=lambda found=beside: found.update(logits=forward()))
                thread.start()
                thread.join(timeout=60)
            torch.testing.assert_close(beside["logits"], learner_out)
            assert not torch.allclose(served, learner_out)
            torch.testing.assert_close(forward(), learner_out)  # and this thread is back on the learner
    finally:
        learner.peft_model.unload()


def _logits(learner: Learner, adapter: str) -> torch.Tensor:
    with torch.no_grad(), learner.serving([adapter] * IDS.shape[1]):
        return learner.peft_model(input_ids=IDS).logits  # type: ignore[no-any-return]


def _move_learner(learner: Learner, seed: int) -> torch.Tensor:
    """New learner weights; returns the learner's logits with them."""
    torch.manual_seed(seed)
    for param in learner._learner_params():
        torch.nn.init.normal_(param, std=0.05)
    return _logits(learner, "learner")


def test_versions_reuse_slots_and_keep_their_weights(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, train={"max_versions_loaded": 2, "tenancy": "shared"})  # no tenants' slots
    learner = Learner(tiny_bundle.causal_lm, config.train)
    try:
        adapters_at_start = set(learner.peft_model.peft_config)
        expected = {}
        for version in (1, 2, 3, 4, 5):
            expected[version] = _move_learner(learner, version)
            learner.publish(version)  # as the trainer does: publish, then release what fell out of the newest 2
            if version >= 3:
                learner.unload_version(version - 2)  # its slot goes to the next version
        assert learner.loaded_versions == {4, 5}
        assert set(learner.peft_model.peft_config) == adapters_at_start  # no adapter added or deleted
        for version in (4, 5):
            torch.testing.assert_close(_logits(learner, learner.adapter_for(version)), expected[version])
        for version in (6, 7):  # nothing released (requests still pinned to 4 and 5): a slot is added
            expected[version] = _move_learner(learner, version)
            learner.publish(version)
        assert len(learner.peft_model.peft_config) == len(adapters_at_start) + 1
        for version in (4, 5, 6, 7):
            torch.testing.assert_close(_logits(learner, learner.adapter_for(version)), expected[version])
        assert all(not p.requires_grad for n, p in learner.peft_model.named_parameters() if ".slot" in n)
    finally:
        learner.peft_model.unload()


def test_written_version_loads_with_peft_and_back(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    learner = Learner(tiny_bundle.causal_lm, tiny_config(tmp_path).train)
    store = AdapterStore(tmp_path / "adapters")
    try:
        published = _move_learner(learner, 1)
        learner.publish(1)
        weights = learner.version_weights(1)
        _move_learner(learner, 2)  # the learner moves on while the write is queued
        meta = AdapterVersion(1, store.now(), 2.0, 1.5, 0, "test")
        store.write(meta, lambda directory: save_adapter(directory, weights, learner.lora_config))
        store.set_active(1)
        store.flush()
        assert store.active() == 1 and [v.version for v in store.versions()] == [1]
        assert (tmp_path / "adapters" / "ACTIVE").read_text() == "1"

        learner.peft_model.load_adapter(str(store.path(1)), adapter_name="by_peft", is_trainable=False)
        torch.testing.assert_close(_logits(learner, "by_peft"), published)
        learner.unload_version(1)
        learner.load_version(7, store.path(1))  # the rollback path: back from disk into a slot
        torch.testing.assert_close(_logits(learner, learner.adapter_for(7)), published)
    finally:
        store.close()
        learner.peft_model.unload()


def test_a_fresh_lineage_learns_at_the_fresh_rate_and_a_settled_one_at_the_configured_rate(
        tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    config = tiny_config(tmp_path, train={"learning_rate": 1e-3, "fresh_lr_factor": 3.0, "fresh_lr_steps": 10.0})
    learner = Learner(tiny_bundle.causal_lm, config.train)

    def step_rate() -> float:
        """The learning rate the next optimizer step applies."""
        for param in learner._learner_params():
            param.grad = torch.full_like(param, 1e-3)
        assert learner.optimizer_step()
        return float(learner.optimizer.param_groups[0]["lr"])

    try:
        assert step_rate() == 3e-3  # the lineage's first step
        settled = learner.park()
        settled.num_optimizer_steps = 1000
        learner.unpark(settled)
        assert abs(step_rate() - 1e-3) < 1e-12
        learner.park()
        learner.unpark(None)  # a new tenant's lineage after the settled one: its own count, from zero
        assert step_rate() == 3e-3
        assert abs(step_rate() - 1e-3 * (1 + 2 * math.exp(-0.1))) < 1e-12
    finally:
        learner.peft_model.unload()
