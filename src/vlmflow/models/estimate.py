"""What a training stage costs, from shapes alone: parameters, activation memory and FLOPs.

The stage's model is built on the meta device (no weights allocated or read: a local HF
model contributes only its config.json) with its LoRA and freezing, then one micro-batch of
meta tensors goes forward and backward. Every storage autograd still holds for backward when
the forward ends is counted once (views share one; parameters and dead branches excluded):
that is the micro-batch's activation memory, exactly for this code path. torch's
FlopCounterMode counts the matmul/attention FLOPs of both passes.
Attention is traced as the fused (flash) kernel that CPU and GPU runs use, which keeps no
sequence x sequence matrix.

`footprint` turns a trace into peak bytes per worker for a precision and a DDP/FSDP layout.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from vlmflow.components.train.setup import build_stage_model
from vlmflow.models.vlm import Vocab, count_parameters
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

FP32 = 4
ADAM_STATES = 2  # AdamW keeps exp_avg and exp_avg_sq per trainable parameter


@dataclass(frozen=True)
class Trace:
    params: dict[str, int]  # count_parameters(): total, trainable and both per part
    micro_batch: int
    image_tokens: int
    sequence: int  # tokens per sample into the language model (image tokens included)
    activations: int  # bytes saved for backward by one micro-batch
    largest_activation: int  # bytes of the largest of them (LM logits, as a rule)
    flops: int  # forward + backward FLOPs of one micro-batch

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Footprint:
    """Peak bytes on one worker while a stage trains."""

    weights: int
    gradients: int  # what the gradients add to the peak (all of them once micro-batches accumulate)
    optimizer: int
    communication: int  # DDP gradient buckets, or FSDP's gathered full parameters
    activations: int
    transient: int  # backward: the gradients into and out of the largest activation (the logits)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


class _FlashAttention(TorchFunctionMode):
    """Route scaled_dot_product_attention to the fused CPU kernel's op, which has meta shapes
    and saves what the real fused kernels save (no attention matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        if key.shape[1] != query.shape[1]:  # grouped-query attention
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, bool(causal), attn_mask=mask, scale=kwargs.get("scale")
        )[0]


def meta_model(spec: ModelSpec, vocab: Vocab, stage: TrainStageSpec) -> nn.Module:
    with torch.device("meta"):
        return build_stage_model(spec, vocab, stage, None, load_weights=False)


def meta_batch(model: nn.Module, vocab: Vocab, stage: TrainStageSpec, image_size: int, micro: int) -> dict:
    """The largest batch the stage can see: every sample at max_text_tokens."""
    sequence = 1 + model.num_image_tokens + stage.max_text_tokens
    ids = torch.full((micro, sequence), vocab.pad_id, dtype=torch.long, device="meta")
    text = model.spec.text.max_length if model.spec.text else 1
    return {
        "pixels": torch.empty(micro, 3, image_size, image_size, device="meta"),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "text_ids": torch.full((micro, text), vocab.pad_id, dtype=torch.long, device="meta"),
        "text_mask": torch.ones((micro, text), dtype=torch.long, device="meta"),
    }


def trace_stage(spec: ModelSpec, vocab: Vocab, stage: TrainStageSpec, image_size: int, micro: int) -> Trace:
    model = meta_model(spec, vocab, stage)
    batch = meta_batch(model, vocab, stage, image_size, micro)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: list[weakref.ref] = []  # weak: a branch the loss never uses frees its tensors, as in a real run

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage()._cdata not in params:
            saved.append(weakref.ref(tensor))
        return tensor

    kinds = [o.kind for o in stage.objectives]
    weights = {o.kind: o.weight for o in stage.objectives}
    with _FlashAttention(), FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses = model(batch, kinds)
        total = sum(weights[k] * losses[k] for k in kinds)
        live = {}  # storage -> bytes; views of one tensor share a storage and count once
        for ref in saved:
            if (tensor := ref()) is not None:
                live[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        if total.requires_grad:
            total.backward()
    sizes = list(live.values())
    return Trace(
        params=count_parameters(model),
        micro_batch=micro,
        image_tokens=model.num_image_tokens,
        sequence=batch["input_ids"].shape[1],
        activations=sum(sizes),
        largest_activation=max(sizes, default=0),
        flops=int(flops.get_total_flops()),
    )


def footprint(
    trace: Trace, precision: str, strategy: str, workers: int, micro: int | None = None, accumulation: int = 1
) -> Footprint:
    """Peak bytes per worker. fp32 master weights always (bf16 is autocast: activations in
    half, weights cast per op); DDP replicates everything and adds gradient buckets of the
    trainable size; FSDP (one unit, as Ray Train wraps it) shards weights and optimizer state
    but gathers the full parameters for forward and backward.
    `micro` rescales the traced activations (linear in the micro-batch). The peak comes as
    backward starts, when every activation is still held: gradients (set to None after each
    step) are not there yet with one micro-batch per step, but are with accumulation."""
    total, trainable = trace.params["total"], trace.params["trainable"]
    scale = (micro or trace.micro_batch) / trace.micro_batch
    activations, largest = trace.activations * scale, trace.largest_activation * scale
    if precision == "bf16":  # half-size activations, but the loss upcasts the logits to fp32
        activations = (activations - largest) / 2 + largest
    shards = workers if strategy == "fsdp" else 1
    # FSDP: the gathered flat parameter; DDP: its bucketed gradient copy (no wrapper on one worker).
    communication = FP32 * total if strategy == "fsdp" else (FP32 * trainable if workers > 1 else 0)
    # FSDP too: a single unit's gradients are whole until reduce-scattered.
    gradients = FP32 * trainable if accumulation > 1 else max(0.0, FP32 * trainable - activations)
    return Footprint(
        weights=int(FP32 * total / shards),
        gradients=int(gradients),
        optimizer=int(FP32 * ADAM_STATES * trainable / shards),
        communication=int(communication),
        activations=int(activations),
        transient=int(2 * largest),
    )
