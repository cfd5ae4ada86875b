"""What a training stage costs, from shapes alone: parameters, activation memory and FLOPs.

The stage's model is built on the meta device (no weights allocated or read: a local HF
model contributes only its config.json) with its LoRA and freezing, then one micro-batch of
meta tensors goes forward and backward. Every storage autograd still holds for backward when
the forward ends is counted once (views share one; parameters and dead branches excluded):
that is the micro-batch's activation memory, exactly for this code path. torch's
FlopCounterMode counts the matmul/attention FLOPs of both passes.
Attention is traced as the fused (flash) kernel that CPU and GPU runs use, which keeps no
sequence x sequence matrix.

The trace also notes, per call of a transformer block (the blocks FSDP shards and activation
checkpointing wraps: `sharding.transformer_blocks`), the storages it was handed and those it
saved: with checkpointing a block keeps only its inputs (what the non-reentrant checkpoint saves)
and saves everything else again when backward recomputes it, one block at a time; and its
forward FLOPs, which that recomputation repeats.

`footprint` turns a trace into peak bytes per worker for a precision, a DDP/FSDP layout and
activation checkpointing on or off.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from vlmflow.components.train.setup import build_stage_model
from vlmflow.components.train.sharding import transformer_blocks
from vlmflow.models.vlm import Vocab, count_parameters
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

FP32 = 4
BF16 = 2
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
    # Activation checkpointing: what stays saved when every block keeps only its inputs, the most one
    # block saves when backward recomputes it, and the blocks' forward FLOPs that the recomputation repeats.
    checkpointed_activations: int
    block_activations: int
    block_flops: int
    # FSDP's units: the parameters of the largest block, and those in no block (the root unit).
    block_params: int
    root_params: int

    def as_dict(self) -> dict:
        return asdict(self)

    def step_flops(self, checkpointing: bool) -> int:
        """Forward + backward FLOPs of one micro-batch, recomputation included."""
        return self.flops + (self.block_flops if checkpointing else 0)


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
    """The stage's model on the meta device, without checkpoint wrappers: the trace sees inside the blocks."""
    plain = stage.model_copy(update={"activation_checkpointing": False})
    with torch.device("meta"):
        return build_stage_model(spec, vocab, plain, None, load_weights=False)


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


class _BlockCalls:
    """Forward hooks on the transformer blocks: for every call, the storages it was handed (strong
    references: meta storages hold no memory, and a storage kept cannot hand its address to another),
    the tensors it saved for backward (weak, as in `trace_stage`) and its forward FLOPs."""

    def __init__(self, model: nn.Module, flops: FlopCounterMode):
        self.calls: list[dict] = []
        self.current: dict | None = None
        self.flops = flops
        self.handles = []
        for block in transformer_blocks(model):
            self.handles.append(block.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage()._cdata: t.untyped_storage() for t in tensors}
        self.current = {"inputs": inputs, "saved": [], "flops": self.flops.get_total_flops()}

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self.current["flops"] = self.flops.get_total_flops() - self.current["flops"]
        self.calls.append(self.current)
        self.current = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _live(refs: list[weakref.ref]) -> dict[int, int]:
    """Storage -> bytes of the saved tensors still alive; views of one tensor share a storage and count once."""
    live = {}
    for ref in refs:
        if (tensor := ref()) is not None:
            live[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    return live


def trace_stage(spec: ModelSpec, vocab: Vocab, stage: TrainStageSpec, image_size: int, micro: int) -> Trace:
    model = meta_model(spec, vocab, stage)
    batch = meta_batch(model, vocab, stage, image_size, micro)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: list[weakref.ref] = []  # weak: a branch the loss never uses frees its tensors, as in a real run
    outside: list[weakref.ref] = []  # those saved outside every block

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage()._cdata not in params:
            saved.append(weakref.ref(tensor))
            (outside if blocks.current is None else blocks.current["saved"]).append(saved[-1])
        return tensor

    kinds = [o.kind for o in stage.objectives]
    weights = {o.kind: o.weight for o in stage.objectives}
    with _FlashAttention(), FlopCounterMode(display=False) as flops:
        blocks = _BlockCalls(model, flops)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses = model(batch, kinds)
        blocks.remove()
        total = sum(weights[k] * losses[k] for k in kinds)
        live = _live(saved)
        # Checkpointed: what is saved outside the blocks, and the inputs of every block call whose graph
        # backward still needs (a call on a dead branch, or one that saved nothing, keeps nothing).
        kept, recompute, block_flops = _live(outside), 0, 0
        for call in blocks.calls:
            inside = _live(call["saved"])
            if not inside:
                continue
            kept.update({key: storage.nbytes() for key, storage in call["inputs"].items()})
            recompute = max(recompute, sum(v for k, v in inside.items() if k not in call["inputs"]))
            block_flops += call["flops"]
        if total.requires_grad:
            total.backward()
    sizes = list(live.values())
    block_params = [sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]
    return Trace(
        params=count_parameters(model),
        micro_batch=micro,
        image_tokens=model.num_image_tokens,
        sequence=batch["input_ids"].shape[1],
        activations=sum(sizes),
        largest_activation=max(sizes, default=0),
        flops=int(flops.get_total_flops()),
        checkpointed_activations=sum(kept.values()),
        block_activations=recompute,
        block_flops=int(block_flops),
        block_params=max(block_params, default=0),
        root_params=sum(p.numel() for p in model.parameters()) - sum(block_params),
    )


def footprint(
    trace: Trace,
    precision: str,
    strategy: str,
    workers: int,
    micro: int | None = None,
    accumulation: int = 1,
    checkpointing: bool = False,
) -> Footprint:
    """Peak bytes per worker. fp32 master weights always (bf16 is autocast: activations in
    half, weights cast per op). DDP replicates everything and adds gradient buckets of the
    trainable size. FSDP (per block, as `sharding.shard_model` wraps it; one worker runs unwrapped)
    divides weights, gradients and optimizer state across the workers, and gathers whole
    parameters unit by unit: the root unit (everything in no block) for the whole step, and the
    largest block twice (the one running and the one FSDP prefetches), in bf16 under bf16.
    Checkpointing keeps the blocks' inputs instead of their activations, plus one block's
    activations while backward recomputes it; that comes after backward has passed the loss, whose
    transient gradients (into and out of the largest activation) are gone by then, so only the
    recomputation's excess over them adds to the peak.
    `micro` rescales the traced activations (linear in the micro-batch). The peak comes as
    backward starts, when every activation is still held: gradients (set to None after each
    step) are not there yet with one micro-batch per step, but are with accumulation (under FSDP
    only each worker's shard: every micro-batch's gradients are reduce-scattered)."""
    total, trainable = trace.params["total"], trace.params["trainable"]
    scale = (micro or trace.micro_batch) / trace.micro_batch
    kept = trace.activations
    if checkpointing:
        recompute = max(0, trace.block_activations - 2 * trace.largest_activation)
        kept = trace.checkpointed_activations + recompute
    activations, largest = kept * scale, min(trace.largest_activation, kept) * scale
    if precision == "bf16":  # half-size activations, but the loss upcasts the logits to fp32
        activations = (activations - largest) / 2 + largest
    sharded = strategy == "fsdp" and workers > 1
    shards = workers if sharded else 1
    if sharded:
        gathered = (BF16 if precision == "bf16" else FP32) * (trace.root_params + 2 * trace.block_params)
    else:  # DDP's bucketed gradient copy (no wrapper on one worker)
        gathered = FP32 * trainable if workers > 1 else 0
    gradients = FP32 * trainable / shards if accumulation > 1 else max(0.0, FP32 * trainable / shards - activations)
    return Footprint(
        weights=int(FP32 * total / shards),
        gradients=int(gradients),
        optimizer=int(FP32 * ADAM_STATES * trainable / shards),
        communication=int(gathered),
        activations=int(activations),
        transient=int(2 * largest),
    )
