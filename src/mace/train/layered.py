"""One micro-batch's forward and backward on the learner, resumable at every decoder-layer boundary.

Each layer runs on a detached copy of its input that requires grad, and its output is kept; the
head computes the loss on the answer positions only (the 49k-wide LM head never sees the prompt)
and back-propagates into the last layer's output; then `torch.autograd.backward(output, grad)`
walks the layers from the last down, handing each input's gradient to the layer below. The LoRA
gradients equal those of one whole-model backward (tests/train/test_layered.py), but the work is
cut into stages of a few milliseconds that the scheduler spreads over iterations.

`LayeredLoss` is the forward-only counterpart (scoring and held-out evaluation): the same layer
stages under a chosen adapter, without a graph, ending with the answer's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from mace.train.replay import TrainSample
from mace.train.work import StageKind, TrainStage


def loss_stages(sample: TrainSample, num_layers: int) -> list[TrainStage]:
    """The upkeep stages of a forward-only loss: each layer, then the head on the answer."""
    return [*[TrainStage(StageKind.FORWARD, sample.num_tokens, is_upkeep=True)] * num_layers,
            TrainStage(StageKind.HEAD, sample.num_tokens - sample.num_prompt_tokens, is_upkeep=True)]


class _SamplePass:
    """The state of one sample between its stages."""

    def __init__(self, causal_lm: Any, sample: TrainSample, scale: float, keep_graph: bool = True) -> None:
        self.causal_lm = causal_lm
        self.keep_graph = keep_graph  # False: forward only, nothing kept for a backward
        self.sample = sample
        self.scale = scale  # sample weight / batch size: the accumulated gradient is the batch mean
        device = causal_lm.lm_head.weight.device
        self.ids = torch.tensor([sample.token_ids], device=device)  # [1, T]
        self.positions = torch.arange(sample.num_tokens, device=device)[None]  # [1, T]
        self.carry: torch.Tensor | None = None  # the next layer's input, [1, T, hidden]
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (layer input, layer output) per layer
        self.grad: torch.Tensor | None = None  # d loss / d the output of the layer to back-propagate next
        self.loss_value: torch.Tensor | None = None  # kept on the device: reading it would wait for the GPU

    @property
    def num_answer_tokens(self) -> int:
        return self.sample.num_tokens - self.sample.num_prompt_tokens

    def stages(self, num_layers: int, first_trained: int = 0) -> list[TrainStage]:
        tokens = self.sample.num_tokens
        if not self.keep_graph:
            return loss_stages(self.sample, num_layers)
        return [
            *[TrainStage(StageKind.FORWARD, tokens)] * num_layers,
            TrainStage(StageKind.HEAD, self.num_answer_tokens),
            *[TrainStage(StageKind.BACKWARD, tokens)] * (num_layers - first_trained),
        ]

    def forward_layer(self, layer: Any, needs_graph: bool = True) -> None:
        decoder = self.causal_lm.model
        if self.carry is None:
            with torch.no_grad():  # the embeddings are frozen: layer 0's input needs no gradient
                self.carry = decoder.embed_tokens(self.ids)
                self.rotary = decoder.rotary_emb(self.carry, self.positions)
        layer_input = self.carry
        if not (self.keep_graph and needs_graph):
            # Below the lowest trained layer nothing needs a gradient: no graph, nothing kept.
            with torch.no_grad():
                self.carry = layer(layer_input, attention_mask=None, position_ids=self.positions,
                                   position_embeddings=self.rotary)
            return
        output = layer(layer_input, attention_mask=None, position_ids=self.positions,
                       position_embeddings=self.rotary)  # no mask: causal attention over the whole sample
        self.saved.append((layer_input, output))
        self.carry = output.detach().requires_grad_(True)

    def answer_loss(self) -> torch.Tensor:
        assert self.carry is not None
        start = self.sample.num_prompt_tokens - 1  # the position whose logits predict the first answer token
        hidden = self.carry[:, start:-1]  # [1, A, hidden]
        logits = self.causal_lm.lm_head(self.causal_lm.model.norm(hidden))  # [1, A, vocab]
        loss = F.cross_entropy(logits[0].float(), self.ids[0, start + 1 :])
        self.loss_value = loss.detach()
        return loss

    def head(self) -> None:
        carry = self.carry
        assert carry is not None
        loss = self.answer_loss()
        # A non-finite loss back-propagates non-finite gradients; the optimizer then skips the step.
        (loss * self.scale).backward()  # type: ignore[no-untyped-call]
        self.grad = carry.grad
        self.carry = None

    def backward_layer(self) -> None:
        layer_input, output = self.saved.pop()
        torch.autograd.backward(output, self.grad)
        self.grad = layer_input.grad if layer_input.requires_grad else None


class _Staged:
    """Work over a model's decoder layers, run one stage at a time in order."""

    def __init__(self, causal_lm: Any) -> None:
        self.layers: list[Any] = list(causal_lm.model.layers)
        self._stages: list[TrainStage] = []
        self._next = 0

    @property
    def remaining(self) -> list[TrainStage]:
        return self._stages[self._next :]

    @property
    def is_done(self) -> bool:
        return self._next == len(self._stages)


def lowest_trained_layer(layers: list[Any]) -> int:
    """The index of the lowest decoder layer holding a weight that requires grad (len(layers): none)."""
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(layers)


class LayeredMicroStep(_Staged):
    """The stages of `samples`' forward and backward, run one at a time in order."""

    def __init__(self, causal_lm: Any, samples: list[TrainSample], batch_size: int) -> None:
        super().__init__(causal_lm)
        self.samples = samples
        self._passes = [_SamplePass(causal_lm, s, s.weight / batch_size) for s in samples]
        # The backward stops at the lowest layer with trained weights (LoRA on the upper layers only).
        self.first_trained = lowest_trained_layer(self.layers)
        self._stages = [stage for p in self._passes for stage in p.stages(len(self.layers), self.first_trained)]
        self._done: torch.cuda.Event | None = None  # recorded after the last stage's kernels on CUDA
        # A bf16 base model trains under bf16 autocast; the LoRA weights and AdamW's state stay fp32.
        self._is_bf16 = causal_lm.model.embed_tokens.weight.dtype == torch.bfloat16

    @property
    def is_settled(self) -> bool:
        """Done, and (on CUDA) its kernels finished, so reading its losses does not stall the engine."""
        return self.is_done and (self._done is None or bool(self._done.query()))  # type: ignore[no-untyped-call]

    @property
    def losses(self) -> list[float]:
        return [math.nan if p.loss_value is None else float(p.loss_value) for p in self._passes]

    def run_next(self) -> None:
        stages_per_sample = 2 * len(self.layers) + 1 - self.first_trained
        sample_pass = self._passes[self._next // stages_per_sample]
        within = self._next % stages_per_sample
        device_type = sample_pass.ids.device.type
        with torch.enable_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self._is_bf16):
            if within < len(self.layers):
                sample_pass.forward_layer(self.layers[within], needs_graph=within >= self.first_trained)
            elif within == len(self.layers):
                sample_pass.head()
            else:
                sample_pass.backward_layer()
        self._next += 1
        if self.is_done and self._passes[0].ids.is_cuda:
            self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._done.record()


class LayeredLoss(_Staged):
    """One sample's answer loss under one adapter, forward only, in the same layer stages.

    `adapter` opens the adapter choice around each stage: other work (serving, training) runs
    between the stages with its own.
    """

    def __init__(self, causal_lm: Any, sample: TrainSample,
                 adapter: Callable[[], AbstractContextManager[None]]) -> None:
        super().__init__(causal_lm)
        self.sample = sample
        self._adapter = adapter
        self._pass = _SamplePass(causal_lm, sample, 1.0, keep_graph=False)
        self._stages = self._pass.stages(len(self.layers))

    @property
    def loss(self) -> float:
        """The loss once done (reading it waits for the device: call it at a step boundary)."""
        value = self._pass.loss_value
        return math.nan if value is None else float(value)

    def run_next(self) -> None:
        with torch.no_grad(), self._adapter():
            if self._next < len(self.layers):
                self._pass.forward_layer(self.layers[self._next])
            else:
                self._pass.answer_loss()
                self._pass.carry = None
        self._next += 1
