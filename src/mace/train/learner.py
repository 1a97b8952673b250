"""The LoRA learner beside the served adapter versions, on one peft model (engine thread only).

Adapters on the model: `learner` (trainable; not `training`, which collides with nn.Module.training),
`candidate` (the learner frozen at a publish gate's start: what the gate evaluates and publishes,
while training goes on) and frozen slots `slot<K>`, each holding one published version still in use.
Version 0 is the base model (`__base__`).

Slots are reused, not added and deleted per version: peft's `add_adapter` walks the whole model
(about 100 ms on the default model on a CPU), and a publish lands in a serving step's interval. A
publish is then a weight copy into a free slot (a few ms).

A batch that mixes versions runs through `MultiLora` (model/multi_lora.py), which keeps the slots'
weights stacked, rather than through peft's mixed-batch forward, which loops over the adapters.

Tenants (mace/tenancy.py): a loaded version is keyed by its lineage and number, so one step serves
many tenants' versions. The one `learner` adapter is lent to one lineage at a time; the others' learner
weights and AdamW moments wait as a `LearnerState` (`park` / `unpark`), a copy of a few MB.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from mace.config import TrainConfig
from mace.model.multi_lora import MultiLora, RowRouting, StackedLora
from mace.tenancy import SHARED
from mace.train.adapter_switch import choose, make_switchable
from mace.train.layered import MAX_PASS_TOKENS, LayeredLoss, LayeredMicroStep
from mace.train.replay import TrainSample

LEARNER = "learner"
CANDIDATE = "candidate"
BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names, so a version loads with peft alone


AdapterKey = tuple[str, int]  # (lineage, version)


@dataclass
class LearnerState:
    """A lineage's learner while another lineage's is on the model: weights and AdamW moments by
    parameter name (peft's saved names), and its step counts."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_optimizer_steps: int = 0
    num_skipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"learner": self.weights, "moments": self.moments, "num_optimizer_steps": self.num_optimizer_steps,
                "num_skipped_steps": self.num_skipped_steps}

    @classmethod
    def from_dict(cls, state: dict[str, Any], names: list[str]) -> LearnerState:
        """A checkpoint's state; one from before tenants (`optimizer`: torch's state dict, by parameter
        index in `names` order) reads too."""
        moments = state.get("moments")
        if moments is None:
            by_index = state.get("optimizer", {}).get("state", {})
            moments = {names[index]: value for index, value in by_index.items()}
        return cls(_saved_names(state["learner"]), moments, int(state.get("num_optimizer_steps", 0)),
                   int(state.get("num_skipped_steps", 0)))


def _saved_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints before tenants keyed the learner's weights by their full names (`.learner.` inside)."""
    return {name.replace(f".{LEARNER}.", "."): value for name, value in weights.items()}


def save_adapter(directory: Path, weights: dict[str, torch.Tensor], lora_config: LoraConfig) -> None:
    """Write a PEFT adapter directory (what `save_pretrained` writes) from weights already copied off the model."""
    directory.mkdir(parents=True, exist_ok=True)
    frozen = copy.copy(lora_config)
    frozen.inference_mode = True
    frozen.save_pretrained(str(directory))
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


class Learner:
    def __init__(self, causal_lm: Any, config: TrainConfig) -> None:
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules), task_type="CAUSAL_LM",
            layers_to_transform=lora_layers(causal_lm.config.num_hidden_layers, config.lora_layer_fraction),
        )
        self.lora_config = lora
        self.config = config
        self.peft_model: Any = get_peft_model(causal_lm, lora, adapter_name=LEARNER)
        # Created now, not at the first publish gate: adding an adapter walks the whole model (about
        # 90 ms on the default model on a CPU), which would land in a serving step's interval.
        self.peft_model.add_adapter(CANDIDATE, lora)
        self._params_of: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        self._slot_of: dict[AdapterKey, str] = {}  # loaded version -> the slot adapter holding it
        self._free_slots: list[str] = []
        self._num_slots = 0
        for _ in range(num_slots(config)):
            self._add_slot()
        self.peft_model.eval()  # dropout is config-controlled; eval mode allows mixed-adapter batches
        self.optimizer = torch.optim.AdamW(self._learner_params(), lr=config.learning_rate)
        self.num_accumulated = 0
        self.num_optimizer_steps = 0
        self.num_skipped_steps = 0
        self._lora_layers: list[Any] = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self._lora_layers:
            make_switchable(layer)
        self._multi = self._stack_slots()
        self.stacks_generation = 0  # counts re-stackings: a CUDA graph captured on older stacks is stale
        # A new lineage's learner starts where peft initialised this one: B = 0, so it adds nothing yet.
        self._initial = LearnerState({name: p.detach().clone() for name, p in self._adapter_params(LEARNER)})

    @property
    def initial_state(self) -> LearnerState:
        """A new lineage's learner, as peft initialised it (B = 0: it adds nothing yet)."""
        return self._initial

    @property
    def loaded_keys(self) -> set[AdapterKey]:
        return set(self._slot_of)

    @property
    def loaded_versions(self) -> set[int]:
        """The shared lineage's loaded versions."""
        return {version for tenant, version in self._slot_of if tenant == SHARED}

    def adapter_for(self, version: int, tenant: str = SHARED) -> str:
        """The adapter name a forward uses to run with `tenant`'s published `version` (which must be loaded)."""
        return BASE if version == 0 else self._slot_of[(tenant, version)]

    @property
    def num_layers(self) -> int:
        return len(self.peft_model.base_model.model.model.layers)

    def _learner_params(self) -> list[torch.nn.Parameter]:
        return [param for _, param in self._adapter_params(LEARNER)]

    def _adapter_params(self, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
        """`adapter`'s parameters with peft's saved names (the adapter's name taken out), in model order.

        Kept per adapter: walking the model's parameters costs a few ms, and adapters are never removed.
        """
        if adapter not in self._params_of:
            marker = f".{adapter}."
            self._params_of[adapter] = [(name.replace(marker, "."), param)
                                        for name, param in self.peft_model.named_parameters() if marker in name]
        return self._params_of[adapter]

    def serving(self, adapter_names: list[str]) -> AbstractContextManager[None]:
        """Context in which row i of the next forward's inputs (token i of the runner's flat batch) runs
        with adapter `adapter_names[i]`: BASE or a slot."""
        unique = set(adapter_names)
        if len(unique) == 1:
            return self._uniform(unique.pop())
        return self._mixed(adapter_names)

    @contextmanager
    def _mixed(self, adapter_names: list[str]) -> Iterator[None]:
        """The LoRA layers compute the base alone; the stacked slots add each row's version."""
        with self._uniform(BASE), self._multi.routed([None if name == BASE else name for name in adapter_names]):
            yield

    def new_row_routing(self, num_rows: int) -> RowRouting:
        """Fixed-shape routing buffers for `static_serving` (a CUDA graph's inputs)."""
        return self._multi.new_row_routing(num_rows)

    def fill_rows(self, adapter_names: list[str], routing: RowRouting) -> None:
        """Route rows 0..n-1 to `adapter_names` (BASE or slots); the rest to the base model."""
        self._multi.fill_rows([None if name == BASE else name for name in adapter_names], routing)

    @contextmanager
    def static_serving(self, routing: RowRouting) -> Iterator[None]:
        """Like `serving`, but every batch, uniform or mixed, routes through `routing`'s buffers, so a
        forward captured within it serves any mix of versions when replayed."""
        with self._uniform(BASE), self._multi.rows_routed(routing):
            yield

    def _stack_slots(self) -> MultiLora:
        slots = [f"slot{k}" for k in range(self._num_slots)]
        stacks = [StackedLora(layer, [(layer.lora_A[slot].weight, layer.lora_B[slot].weight) for slot in slots],
                              layer.scaling[slots[0]]) for layer in self._lora_layers]
        return MultiLora(stacks, slots)

    def _uniform(self, name: str) -> AbstractContextManager[None]:
        """One adapter (or none) for the whole batch, on this thread only (serving and training run
        on two threads at once on a CPU: train/adapter_switch.py).

        peft's own switches (`disable_adapter`, `set_adapter`) walk every module and toggle
        requires_grad, which costs as much as a decode step's kernel launches on a GPU, and would
        switch the other thread's forward too.
        """
        return choose(disabled=name == BASE, active=[LEARNER if name == BASE else name])

    def micro_step(self, samples: list[TrainSample], max_pass_tokens: int = MAX_PASS_TOKENS) -> LayeredMicroStep:
        """Forward and backward of `samples` on the learner, in layer stages; gradients accumulate."""
        return LayeredMicroStep(self.peft_model.base_model.model, samples, self.config.batch_size, max_pass_tokens)

    def accumulated(self, num_samples: int) -> None:
        self.num_accumulated += num_samples

    def batch_ready(self) -> bool:
        return self.num_accumulated >= self.config.batch_size

    def optimizer_step(self) -> bool:
        """Apply the accumulated gradients unless any is NaN/inf; True if the weights changed."""
        params = [p for p in self._learner_params() if p.grad is not None]
        # One norm over all gradients: a single device read instead of one per parameter.
        total_norm = torch.nn.utils.clip_grad_norm_(params, 1.0) if params else torch.tensor(0.0)
        finite = bool(params) and bool(torch.isfinite(total_norm))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.config, self.num_optimizer_steps)
            self.optimizer.step()
            self.num_optimizer_steps += 1
        else:
            self.num_skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.num_accumulated = 0
        return finite

    def discard_gradients(self) -> None:
        """Forget a half-accumulated batch (a training stage failed mid-way)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.num_accumulated = 0

    def loss_pass(self, samples: list[TrainSample], adapter: str) -> LayeredLoss:
        """`samples`' answer losses under `adapter` (a `v<N>`, BASE, CANDIDATE or LEARNER), in layer stages."""
        return LayeredLoss(self.peft_model.base_model.model, samples, lambda: self._uniform(adapter))

    def snapshot_candidate(self, parked: LearnerState | None = None) -> None:
        """Freeze the learner's weights as they are now as the `candidate` adapter (or a parked lineage's)."""
        if parked is None:
            self._copy_adapter(LEARNER, CANDIDATE)
        else:
            self._write_weights(CANDIDATE, parked.weights)

    def publish(self, version: int, source: str = LEARNER, tenant: str = SHARED) -> None:
        """Freeze a copy of `source`'s weights (the learner's, or the gate's candidate) as `tenant`'s `version`."""
        self._copy_adapter(source, self._take_slot((tenant, version)))

    # ---- lending the learner to one lineage at a time ----

    def park(self) -> LearnerState:
        """Take the learner's state off the model (weights copied, AdamW moments moved), for `unpark`."""
        assert self.num_accumulated == 0, "a lineage is parked only between optimizer steps"
        params = self._adapter_params(LEARNER)
        state = LearnerState({name: p.detach().clone() for name, p in params},
                             {name: self.optimizer.state.pop(p) for name, p in params if p in self.optimizer.state},
                             self.num_optimizer_steps, self.num_skipped_steps)
        return state

    def unpark(self, state: LearnerState | None) -> None:
        """Put a parked lineage's learner on the model; None: a new lineage's, as peft initialised it."""
        state = state if state is not None else self._initial
        self._write_weights(LEARNER, state.weights)
        for name, param in self._adapter_params(LEARNER):
            self.optimizer.state.pop(param, None)
            if name in state.moments:  # a checkpoint's moments are on the CPU; AdamW keeps `step` there
                self.optimizer.state[param] = {
                    key: value.to(param.device) if isinstance(value, torch.Tensor) and key != "step" else value
                    for key, value in state.moments[name].items()}
        self.num_optimizer_steps, self.num_skipped_steps = state.num_optimizer_steps, state.num_skipped_steps

    def capture(self) -> LearnerState:
        """A copy of the learner's state as it is now (for a checkpoint), on the CPU."""
        params = self._adapter_params(LEARNER)
        moments = {name: {key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                          for key, value in self.optimizer.state[p].items()}
                   for name, p in params if p in self.optimizer.state}
        return LearnerState({name: p.detach().to("cpu", copy=True) for name, p in params}, moments,
                            self.num_optimizer_steps, self.num_skipped_steps)

    def _write_weights(self, adapter: str, weights: dict[str, torch.Tensor]) -> None:
        params = self._adapter_params(adapter)
        if {name for name, _ in params} != set(weights) or any(
                weights[name].shape != param.shape for name, param in params):
            raise AdapterShapeMismatch(describe_lora(weights), describe_lora(dict(params)))
        with torch.no_grad():
            for name, param in params:
                param.copy_(weights[name])

    def _copy_adapter(self, source: str, target: str) -> None:
        with torch.no_grad():
            for (_, value), (_, param) in zip(self._adapter_params(source), self._adapter_params(target), strict=True):
                param.copy_(value)

    def load_version(self, version: int, directory: Path, tenant: str = SHARED) -> None:
        """Load a PEFT adapter directory (one `save_adapter` wrote) as `tenant`'s `version`."""
        self.install_version(version, read_adapter(directory), tenant)

    def install_version(self, version: int, weights: dict[str, torch.Tensor], tenant: str = SHARED) -> None:
        """Copy weights read off the engine thread (`read_adapter`) into a slot as `tenant`'s `version`."""
        self._take_slot((tenant, version))
        try:
            self._write_weights(self._slot_of[(tenant, version)], weights)
        except Exception:
            self.unload_version(version, tenant)
            raise

    def unload_version(self, version: int, tenant: str = SHARED) -> None:
        slot = self._slot_of.pop((tenant, version), None)
        if slot is not None:
            self._free_slots.append(slot)

    def version_weights(self, version: int, tenant: str = SHARED) -> dict[str, torch.Tensor]:
        """A CPU copy of `version`'s weights under peft's saved names: safe to write from another thread."""
        return {name: param.detach().to("cpu", copy=True)
                for name, param in self._adapter_params(self.adapter_for(version, tenant))}

    def _take_slot(self, key: AdapterKey) -> str:
        if key in self._slot_of:
            return self._slot_of[key]
        if not self._free_slots:  # more versions pinned by running requests than slots: grow once
            self._add_slot()
            self._multi = self._stack_slots()
            self.stacks_generation += 1
        self._slot_of[key] = slot = self._free_slots.pop()
        return slot

    def _add_slot(self) -> None:
        slot = f"slot{self._num_slots}"
        self.peft_model.add_adapter(slot, self.lora_config)
        self._num_slots += 1
        self._free_slots.append(slot)
        self._freeze_all_but_learner()
        if not self.peft_model.training:  # a slot grown later: its dropout modules start in train mode
            self.peft_model.eval()

    def _freeze_all_but_learner(self) -> None:
        # peft's add/load may mark new adapters trainable or switch the active one; keep the learner.
        self.peft_model.base_model.set_adapter(LEARNER)
        for name, param in self.peft_model.named_parameters():
            param.requires_grad_(f".{LEARNER}." in name)

    def parameter_names(self) -> list[str]:
        """The learner's parameter names in the optimizer's order (old checkpoints index moments by it)."""
        return [name for name, _ in self._adapter_params(LEARNER)]


class AdapterShapeMismatch(ValueError):
    """Stored adapter weights (a checkpoint or a version in the data dir) that the configured LoRA cannot hold."""

    def __init__(self, stored: str, configured: str) -> None:
        super().__init__(
            f"the data dir holds adapters with LoRA {stored}, but this server is configured for LoRA "
            f"{configured}; set train.target_modules, train.lora_rank and train.lora_layer_fraction to "
            "what the data dir was trained with, or start with another data_dir")


def describe_lora(weights: dict[str, torch.Tensor]) -> str:
    """`rank 8 on q_proj, v_proj of layers 0-29` from LoRA weights' names and shapes."""
    modules: set[str] = set()
    layers: set[int] = set()
    ranks: set[int] = set()
    for name, value in weights.items():
        parts = name.split(".")
        if "lora_A" not in parts or "layers" not in parts:
            continue
        at = parts.index("lora_A")
        modules.add(parts[at - 1])
        layers.add(int(parts[parts.index("layers") + 1]))
        ranks.add(int(value.shape[0]))
    if not layers:
        return "with no LoRA weights"
    rank = "/".join(str(r) for r in sorted(ranks))
    return f"rank {rank} on {', '.join(sorted(modules))} of layers {min(layers)}-{max(layers)}"


def learning_rate(config: TrainConfig, num_optimizer_steps: int) -> float:
    """The learning rate of a lineage's next optimizer step: `fresh_lr_factor` times `learning_rate` at
    its first, easing exponentially to `learning_rate` (the step count is the lineage's, lent with it)."""
    extra = (config.fresh_lr_factor - 1.0) * math.exp(-num_optimizer_steps / config.fresh_lr_steps)
    return config.learning_rate * (1.0 + extra)


def lora_layers(num_layers: int, fraction: float) -> list[int]:
    """The top `fraction` of `num_layers` decoder layers (at least one), the ones that get LoRA."""
    count = min(num_layers, max(1, round(num_layers * fraction)))
    return list(range(num_layers - count, num_layers))


def num_slots(config: TrainConfig) -> int:
    """Slots made at start (making one later walks the model in a serving step): the newest versions
    kept and the one being published, plus each resident tenant's active version."""
    return config.max_versions_loaded + 1 + resident_tenants(config)


def resident_tenants(config: TrainConfig) -> int:
    """Tenants' lineages held in memory at most, besides the shared one."""
    return config.max_resident_tenants if config.tenancy == "per_tenant" else 0


def read_adapter(directory: Path) -> dict[str, torch.Tensor]:
    """A published version's weights from its PEFT directory, on the CPU (any thread: disk only)."""
    return load_file(str(directory / ADAPTER_WEIGHTS), device="cpu")
