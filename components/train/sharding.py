"""FSDP for the training loop: PyTorch's FSDP2 (`fully_shard`) on every transformer block, then the root.

Works on CPU (gloo) as on GPU (NCCL): parameters become DTensors sharded on dim 0 across the workers,
gathered block by block in forward and backward, and gradients are reduce-scattered, so each worker
holds 1/N of the weights, gradients and AdamW state between steps. Frozen blocks are sharded too (they
hold weights); FSDP2 also takes groups that mix trainable and frozen parameters (LoRA adapters in a
frozen decoder layer, the frozen vision embeddings in the root group next to the trainable LM
embeddings): only parameters that got a gradient are reduced.

fully_shard refuses scalar (0-dim) parameters, e.g. the contrastive head's temperature and SigLIP's
bias. They stay plain replicated tensors outside FSDP (`ignored_params`), and their gradients are
averaged over the workers here, in `gradient_sync` after the last micro-batch's backward, as DDP would.

Activation checkpointing (`checkpoint_blocks`) wraps the same blocks in PyTorch's non-reentrant checkpoint
wrapper before they are sharded, so FSDP's hooks sit outside the checkpoint: a block is gathered once for
its forward and once for its backward, where it is recomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

try:  # transformers >= 4.52: the base class of every HF encoder / decoder layer
    from transformers.modeling_layers import GradientCheckpointingLayer as _HfLayer
except ImportError:  # pragma: no cover
    _HfLayer = None

REPLICATED = "vlmflow_replicated"  # the sharded model's attribute: its scalar parameters, kept whole
LAYER_LISTS = ("layers", "layer")  # ModuleList names of transformer stacks (HF, nn.Transformer*, connectors)
LAYER_TYPES = tuple(t for t in (_HfLayer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) if t is not None)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks in module order, outermost only: HF encoder / decoder layers
    (CLIP, SigLIP, Llama, ...), nn.TransformerEncoderLayer / DecoderLayer, and every entry of a
    ModuleList named `layers` or `layer` (Q-Former, resampler). A block inside a block is not listed.
    A checkpointed block (`checkpoint_blocks`) is listed as its checkpoint wrapper."""
    listed: set[int] = set()
    for module in model.modules():
        for name in LAYER_LISTS:
            stack = getattr(module, name, None)
            if isinstance(stack, nn.ModuleList):
                listed.update(id(m) for m in stack)
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules within a block already taken
    for module in model.modules():  # pre-order: a block comes before its descendants
        if module is model or id(module) in inside:
            continue
        inner = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
        if id(module) in listed or isinstance(inner, LAYER_TYPES):
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing on every transformer block: each is replaced in its parent by a
    non-reentrant CheckpointWrapper, which keeps only the block's inputs for backward and recomputes the
    block there (RNG state restored: dropout draws the same masks). One mechanism for HF layers, nn.Transformer
    layers and the connectors' own; it works with frozen blocks and LoRA adapters, and the state dict keeps
    its keys (the wrapper drops its prefix). In place, before `shard_model`; returns the model."""
    blocks = {id(block) for block in transformer_blocks(model)}
    apply_activation_checkpointing(model, check_fn=lambda module: id(module) in blocks)
    return model


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: blocks compute in bf16, gradients are reduced (and kept) in fp32; fp32: no casting."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, device_type: str, precision: str, mesh: DeviceMesh | None = None) -> nn.Module:
    """`fully_shard` every transformer block, then the root (embeddings, norms, heads, connector MLP:
    everything left), across all workers of the default process group. In place; returns the model
    (now also an FSDPModule). The model must already be on its device and every worker must hold the
    same initial weights (each keeps its own shard of them)."""
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = mixed_precision(precision)
    scalars = [p for p in model.parameters() if p.ndim == 0]
    kwargs = {"mesh": mesh, "mp_policy": policy, "ignored_params": set(scalars)}
    # Bottom-up, as fully_shard requires: a call groups the parameters not taken by an earlier one.
    # The root keeps its parameters gathered after forward (backward needs them first); blocks reshard.
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    setattr(model, REPLICATED, scalars)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward. DDP: gradients are reduced across workers only
    on the last micro-batch of a step and accumulate locally before (no_sync). FSDP: every
    micro-batch's gradients are reduce-scattered as backward passes each block and accumulate in the
    worker's shard, so no worker ever holds the whole gradient (skipping the reduce-scatter, FSDP2's
    set_requires_gradient_sync(False), would keep every unsharded gradient until the last
    micro-batch: at 7B, 28 GB per worker); the few parameters FSDP does not shard are averaged
    once, after the last."""
    if isinstance(model, FSDPModule):
        yield
        if last:
            average_replicated_gradients(model)
    elif not last and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def average_replicated_gradients(model: nn.Module) -> None:
    """The mean over workers of the gradients FSDP does not reduce (its scalar parameters)."""
    grads = [p.grad for p in getattr(model, REPLICATED, []) if p.grad is not None]
    if not grads:
        return
    flat = torch.stack([g.float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, value in zip(grads, flat, strict=True):
        grad.copy_(value)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over all workers' gradients; the global norm (before clipping) as a float.
    torch reduces the norm of sharded (DTensor) gradients across the shards (a replicated DTensor);
    a model with both sharded and plain (replicated scalar) parameters has the two norms combined,
    as clip_grad_norm_ cannot mix DTensors and tensors in one norm."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    if not (sharded and plain):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    sharded_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
    plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain]).to(sharded_norm.device)
    norm = torch.linalg.vector_norm(torch.stack([sharded_norm.full_tensor(), plain_norm]))
    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, norm)
    torch.nn.utils.clip_grads_with_norm_(plain, max_norm, norm)
    return float(norm)
