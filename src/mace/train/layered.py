"""One micro-batch's forward and backward on the learner, resumable at every decoder-layer boundary.

Each layer runs on a detached copy of its input that requires grad, and its output is kept; the
head computes the loss on the answer positions only (the 49k-wide LM head never sees the prompt)
and back-propagates into the last layer's output; then `torch.autograd.backward(output, grad)`
walks the layers from the last down, handing each input's gradient to the layer below. The LoRA
gradients equal those of one whole-model backward (tests/train/test_layered.py), but the work is
cut into stages of a few milliseconds that the scheduler spreads over iterations.

Samples go through the layers together, a few per pass (`passes`): right-padded to the longest, so
causal attention never lets a real token see a pad and each sample's loss and gradient are its own.
Identical samples (a correction sent several times) take one row: its loss is each one's, and its
gradient counts once per copy (`distinct`).
A CPU runs a layer over four 48-token samples at about 1.5x (forward and backward) to 2x (forward
only) the tokens/s of one at a time (docs/results/train/learn.md, "Samples in one pass").

The head is cut too, into stages of at most `HEAD_STAGE_TOKENS` answer positions: the LM head reads
its whole 49k x hidden weight for every stage whatever its rows, and a pass's answers in one stage
(40 positions for five samples) were predicted at 0.2 s on the 2-core CPU, more than a step beside one
chat stream has to spare, so scoring never ran while anyone chatted. Each part's loss back-propagates
into the last layer's output on its own; the gradients add up to the whole head's.

`LayeredLoss` is the forward-only counterpart (scoring and held-out evaluation): the same layer
stages under a chosen adapter, without a graph, ending with each sample's answer loss.
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

# A pass's padded size: what one sample of `train.max_sample_tokens` (512 by default) costs alone, so a
# pass never holds more activations than the longest single sample did, and a layer's stage stays a
# few tens of milliseconds on a 2-core CPU.
MAX_PASS_TOKENS = 256
# Answer positions per head stage: a short answer ("Your cat is called Zorblax.") in one or two.
HEAD_STAGE_TOKENS = 8


def passes(samples: list[TrainSample], max_tokens: int = MAX_PASS_TOKENS) -> list[list[TrainSample]]:
    """`samples` in order, cut into runs whose padded size (rows x longest) stays within `max_tokens`;
    a longer sample goes alone."""
    groups: list[list[TrainSample]] = []
    for sample in samples:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * max(sample.num_tokens, *(s.num_tokens for s in group)) <= max_tokens:
            group.append(sample)
        else:
            groups.append([sample])
    return groups


def distinct(samples: list[TrainSample]) -> tuple[list[TrainSample], list[int]]:
    """The samples with different tokens (first copies, in order), and each sample's place among them."""
    rows: dict[tuple[int, tuple[int, ...]], int] = {}
    unique: list[TrainSample] = []
    places = []
    for sample in samples:
        key = (sample.num_prompt_tokens, tuple(sample.token_ids))
        if key not in rows:
            rows[key] = len(unique)
            unique.append(sample)
        places.append(rows[key])
    return unique, places


def padded_tokens(samples: list[TrainSample]) -> int:
    return len(samples) * max(s.num_tokens for s in samples)


def head_parts(num_answer_tokens: int) -> list[int]:
    """The answer positions of each head stage, in order."""
    starts = range(0, num_answer_tokens, HEAD_STAGE_TOKENS)
    return [min(HEAD_STAGE_TOKENS, num_answer_tokens - start) for start in starts]


def loss_stages(samples: list[TrainSample], num_layers: int) -> list[TrainStage]:
    """The upkeep stages of a forward-only loss: each layer, then the head on the answers, in parts."""
    answers = sum(s.num_tokens - s.num_prompt_tokens for s in samples)
    return [*[TrainStage(StageKind.FORWARD, padded_tokens(samples), is_upkeep=True)] * num_layers,
            *[TrainStage(StageKind.HEAD, part, is_upkeep=True) for part in head_parts(answers)]]


class _Pass:
    """The state of one pass (a few samples, right-padded into one batch) between its stages."""

    def __init__(self, causal_lm: Any, samples: list[TrainSample], scales: list[float],
                 keep_graph: bool = True) -> None:
        self.causal_lm = causal_lm
        self.keep_graph = keep_graph  # False: forward only, nothing kept for a backward
        self.samples = samples
        # Per sample: weight / batch size, so the accumulated gradient is the batch mean.
        self.scales = torch.tensor(scales, dtype=torch.float32)
        device = causal_lm.lm_head.weight.device
        longest = max(s.num_tokens for s in samples)
        # Pads repeat each sample's last token: any id would do, no real position attends to them.
        rows = [s.token_ids + [s.token_ids[-1]] * (longest - s.num_tokens) for s in samples]
        self.ids = torch.tensor(rows, device=device)  # [B, T]
        self.positions = torch.arange(longest, device=device)[None]  # [1, T]
        self.carry: torch.Tensor | None = None  # the next layer's input, [B, T, hidden]
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (layer input, layer output) per layer
        self.grad: torch.Tensor | None = None  # d loss / d the output of the layer to back-propagate next
        self.loss_values: torch.Tensor | None = None  # [B], kept on the device: reading waits for the GPU
        # The answer positions, flattened over the rows: each one's row (its sample), position and the token
        # it predicts, and each sample's count of them; filled by the first head part.
        self._owners = self._answer_positions = self._targets = self._counts = torch.empty(0)
        self._per_token: list[torch.Tensor] = []  # each head part's per-position losses

    @property
    def num_answer_tokens(self) -> int:
        return sum(s.num_tokens - s.num_prompt_tokens for s in self.samples)

    def stages(self, num_layers: int, first_trained: int = 0) -> list[TrainStage]:
        if not self.keep_graph:
            return loss_stages(self.samples, num_layers)
        tokens = padded_tokens(self.samples)
        return [
            *[TrainStage(StageKind.FORWARD, tokens)] * num_layers,
            *[TrainStage(StageKind.HEAD, part) for part in self.head_parts],
            *[TrainStage(StageKind.BACKWARD, tokens)] * (num_layers - first_trained),
        ]

    @property
    def head_parts(self) -> list[int]:
        return head_parts(self.num_answer_tokens)

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
                       position_embeddings=self.rotary)  # no mask: causal attention, pads only at the end
        self.saved.append((layer_input, output))
        self.carry = output.detach().requires_grad_(True)

    def _index_answers(self) -> None:
        owners, positions, targets = [], [], []
        for row, sample in enumerate(self.samples):
            # The position whose logits predict the first answer token, through the one before the last.
            span = range(sample.num_prompt_tokens - 1, sample.num_tokens - 1)
            owners += [row] * len(span)
            positions += list(span)
            targets += sample.token_ids[span.start + 1 : span.stop + 1]
        device = self.ids.device
        self._owners = torch.tensor(owners, device=device)
        self._counts = torch.bincount(self._owners, minlength=len(self.samples)).float()
        self._answer_positions = torch.tensor(positions, device=device)
        self._targets = torch.tensor(targets, device=device)

    def head_part(self, part: int, backward: bool) -> None:
        """Head stage `part`: the loss on its answer positions and, when training, its backward into
        the last layer's output (the parts' gradients add up there). The last part settles each
        sample's mean answer loss and hands the gradient to the layers."""
        carry = self.carry
        assert carry is not None
        if part == 0:
            self._index_answers()
            self._per_token = []
        start = part * HEAD_STAGE_TOKENS
        chosen = slice(start, start + HEAD_STAGE_TOKENS)
        hidden = carry[self._owners[chosen], self._answer_positions[chosen]]  # [part, hidden]
        logits = self.causal_lm.lm_head(self.causal_lm.model.norm(hidden))  # [part, vocab]
        per_token = F.cross_entropy(logits.float(), self._targets[chosen], reduction="none")
        if backward:
            owners = self._owners[chosen]
            # Each sample's loss is its answer's mean, weighted by its scale: so is each position's share.
            weights = (self.scales.to(per_token.device) / self._counts)[owners]
            # A non-finite loss back-propagates non-finite gradients; the optimizer then skips the step.
            (per_token * weights).sum().backward()  # type: ignore[no-untyped-call]
        self._per_token.append(per_token.detach())
        if part + 1 < len(self.head_parts):
            return
        every = torch.cat(self._per_token)
        sums = torch.zeros(len(self.samples), device=every.device).index_add_(0, self._owners, every)
        self.loss_values = sums / self._counts
        self._per_token = []
        if backward:
            self.grad = carry.grad
        self.carry = None

    def backward_layer(self) -> None:
        layer_input, output = self.saved.pop()
        torch.autograd.backward(output, self.grad)
        self.grad = layer_input.grad if layer_input.requires_grad else None

    def losses(self) -> list[float]:
        if self.loss_values is None:
            return [math.nan] * len(self.samples)
        return [float(value) for value in self.loss_values.tolist()]


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
    """The stages of `samples`' forward and backward, a few samples per pass, run one at a time in order."""

    def __init__(self, causal_lm: Any, samples: list[TrainSample], batch_size: int,
                 max_pass_tokens: int = MAX_PASS_TOKENS) -> None:
        super().__init__(causal_lm)
        self.samples = samples
        unique, self._places = distinct(samples)
        scales = [0.0] * len(unique)
        for sample, place in zip(samples, self._places, strict=True):
            scales[place] += sample.weight / batch_size
        self._passes, start = [], 0
        for group in passes(unique, max_pass_tokens):  # in order: a group's scales are the next slice
            self._passes.append(_Pass(causal_lm, group, scales[start : start + len(group)]))
            start += len(group)
        # The backward stops at the lowest layer with trained weights (LoRA on the upper layers only).
        self.first_trained = lowest_trained_layer(self.layers)
        self._stages, self._owners = [], []
        for sample_pass in self._passes:
            stages = sample_pass.stages(len(self.layers), self.first_trained)
            self._stages += stages
            self._owners += [(sample_pass, within) for within in range(len(stages))]
        self._done: torch.cuda.Event | None = None  # recorded after the last stage's kernels on CUDA
        # A bf16 base model trains under bf16 autocast; the LoRA weights and AdamW's state stay fp32.
        self._is_bf16 = causal_lm.model.embed_tokens.weight.dtype == torch.bfloat16

    @property
    def is_settled(self) -> bool:
        """Done, and (on CUDA) its kernels finished, so reading its losses does not stall the engine."""
        return self.is_done and (self._done is None or bool(self._done.query()))  # type: ignore[no-untyped-call]

    @property
    def losses(self) -> list[float]:
        """Each sample's answer loss, in the order of `samples`."""
        rows = [loss for sample_pass in self._passes for loss in sample_pass.losses()]
        return [rows[place] for place in self._places]

    def run_next(self) -> None:
        sample_pass, within = self._owners[self._next]
        device_type = sample_pass.ids.device.type
        with torch.enable_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self._is_bf16):
            head_part = within - len(self.layers)
            if head_part < 0:
                sample_pass.forward_layer(self.layers[within], needs_graph=within >= self.first_trained)
            elif head_part < len(sample_pass.head_parts):
                sample_pass.head_part(head_part, backward=True)
            else:
                sample_pass.backward_layer()
        self._next += 1
        if self.is_done and self._passes[0].ids.is_cuda:
            self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._done.record()


class LayeredLoss(_Staged):
    """Some samples' answer losses under one adapter, forward only, in one pass of layer stages.

    `adapter` opens the adapter choice around each stage: other work (serving, training) runs
    between the stages with its own.
    """

    def __init__(self, causal_lm: Any, samples: list[TrainSample],
                 adapter: Callable[[], AbstractContextManager[None]]) -> None:
        super().__init__(causal_lm)
        self.samples = samples
        self._adapter = adapter
        self._pass = _Pass(causal_lm, samples, [1.0] * len(samples), keep_graph=False)
        self._stages = self._pass.stages(len(self.layers))

    @property
    def losses(self) -> list[float]:
        """Each sample's loss once done, NaN before (reading them waits for the device: call it at a
        step boundary)."""
        return self._pass.losses() if self.is_done else [math.nan] * len(self.samples)

    def run_next(self) -> None:
        with torch.no_grad(), self._adapter():
            if self._next < len(self.layers):
                self._pass.forward_layer(self.layers[self._next])
            else:
                self._pass.head_part(self._next - len(self.layers), backward=False)
        self._next += 1
