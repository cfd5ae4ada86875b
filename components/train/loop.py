"""The per-worker training loop that Ray Train runs on every worker.

Deterministic: the sample order is a function of (seed, epoch), each step reseeds torch from
(seed, step, rank), and a checkpoint holds everything else (weights, optimizer, scheduler,
step), so a run resumed from step k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vlmflow.artifacts import atomic_write_text
from vlmflow.chat import ChatFormat
from vlmflow.components.train import checkpoint as ckpt
from vlmflow.components.train.data import Collator, ImageSpec, ShardSamples, TextCodec
from vlmflow.components.train.interleaved import InterleavedCodec, InterleavedCollator, is_flamingo
from vlmflow.components.train.loader import Share, StepBatches, load_steps
from vlmflow.components.train.mixture import Resolved
from vlmflow.components.train.packing import pack_batch
from vlmflow.components.train.setup import (
    CHECKPOINT_CONFIG,
    build_stage_model,
    merge_lora,
    model_config,
    write_model_folder,
)
from vlmflow.components.train.sharding import clip_gradients, gradient_sync, shard_model
from vlmflow.models.vlm import Vocab, count_parameters
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec
from vlmflow.stage import HISTORY


@dataclass
class WorkerConfig:
    model: dict
    stage: dict
    vocab: dict
    image: dict
    seed: int
    tokenizer: str
    index: str
    store_root: str
    out: str
    init: str | None
    strategy: str
    threads: int
    total_steps: int
    steps_per_epoch: int
    mixture: dict  # Resolved.as_dict(): which rows of `index` each epoch trains on
    chat: dict | None = None  # ChatFormat.as_dict(): the stage's conversation template


def lr_factor(step: int, total: int, stage: TrainStageSpec) -> float:
    schedule = stage.schedule
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    progress = (step - schedule.warmup_steps) / max(1, total - schedule.warmup_steps)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on matrices only; biases, norm scales and other vectors are not
    decayed (as in timm and Hugging Face). No decay: one group."""
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay}]
    groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_worker(raw: dict) -> None:
    cfg = WorkerConfig(**raw)
    start_rss = psutil.Process().memory_info().rss
    torch.set_num_threads(cfg.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stage = TrainStageSpec.model_validate(cfg.stage)
    spec = ModelSpec.model_validate(cfg.model)
    vocab = Vocab(cfg.vocab["size"], cfg.vocab["special"])
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_stage_model(spec, vocab, stage, Path(cfg.init) if cfg.init else None)
    counts = count_parameters(model)
    device = ray.train.torch.get_device()
    # FSDP: PyTorch's FSDP2 on every transformer block (CPU/gloo and GPU alike), not Ray's prepare_model
    # (FSDP1 around the whole model, GPU only). One worker: nothing to shard, as Ray does for DDP.
    sharded = cfg.strategy == "fsdp" and world > 1
    if sharded:
        wrapped = shard_model(model.to(device), device.type, stage.precision)
    else:  # DDP (Ray's prepare_model leaves a single worker's model unwrapped)
        kwargs = {"find_unused_parameters": True}
        wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=kwargs)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(param_groups(params, opt.weight_decay), lr=opt.lr, betas=opt.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.total_steps, stage))

    out = Path(cfg.out)
    checkpoints = out / "checkpoints"
    start = resume(checkpoints, wrapped, optimizer, scheduler)
    samples = ShardSamples(pl.read_parquet(cfg.index), Path(cfg.store_root))
    mix = Resolved.from_dict(cfg.mixture)
    image = ImageSpec.of(cfg.image)
    chat = ChatFormat.of(cfg.chat) if cfg.chat else None
    codec = TextCodec(
        Path(cfg.tokenizer), vocab.special, model.num_image_tokens, stage.max_text_tokens, chat, stage.overflow
    )
    text_length = spec.text.max_length if spec.text else None
    collate = Collator(
        samples, image, codec, stage.prompt, text_length, stage.hflip, cfg.seed, stage.shift, stage.choice_template
    )
    if is_flamingo(spec):  # interleaved image-text sequences
        codec = InterleavedCodec(Path(cfg.tokenizer), vocab.special, stage.max_text_tokens)
        collate = InterleavedCollator(samples, image, codec, stage, cfg.seed)
    kinds = [o.kind for o in stage.objectives]
    weights = {o.kind: o.weight for o in stage.objectives}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if stage.precision == "bf16" else None
    history = out / HISTORY
    config = model_config(spec, vocab, cfg.image, model.num_image_tokens)
    if cfg.chat:  # evaluation and export prompt in the template the model learned
        config["chat"] = cfg.chat
    if rank == 0 and start > 0 and history.exists():  # steps after the checkpoint are redone
        rows = [row for row in map(parse_row, history.read_text().splitlines()) if row and row["step"] <= start]
        # A new file in its place (not rewritten in place): a reader that has read further sees a new file.
        atomic_write_text(history, "".join(json.dumps(row) + "\n" for row in rows))
    if rank == 0 and start == 0:
        history.unlink(missing_ok=True)
        (out / "parameters.json").write_text(json.dumps(counts, indent=2))
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / CHECKPOINT_CONFIG).write_text(json.dumps({**config, "stage": cfg.stage}, indent=2))
        shutil.copyfile(cfg.tokenizer, checkpoints / "tokenizer.json")

    share = Share(mix, cfg.seed, cfg.steps_per_epoch, stage.batch_size, stage.micro_batch_size, rank, world)
    pack = None
    if stage.packing:  # rows as long as the longest sample the codec writes
        capacity = 1 + model.num_image_tokens + stage.max_text_tokens
        pack = functools.partial(pack_batch, capacity=capacity, image_id=vocab.image_id, pad_id=vocab.pad_id)
    loaded = load_steps(StepBatches(collate, share, pack), start, cfg.total_steps, stage.loader_workers)
    for step in range(start, cfg.total_steps):
        started = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        loaded_step = next(loaded)
        epoch, parts = loaded_step.epoch, loaded_step.parts
        sums = {k: 0.0 for k in kinds}
        tokens = 0
        for i, part in enumerate(parts):
            batch = {k: v.to(device) for k, v in part.items()}
            tokens += int(batch["attention_mask"].sum())
            with gradient_sync(wrapped, last=i == len(parts) - 1):
                with autocast or contextlib.nullcontext():
                    losses = wrapped(batch, kinds)
                total = sum(weights[k] * losses[k] for k in kinds) / len(parts)
                total.backward()
            for k in kinds:
                sums[k] += float(losses[k].detach()) / len(parts)
        grad_norm = clip_gradients(params, opt.grad_clip or float("inf"))  # the global norm under FSDP too
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        values = {**{f"loss_{k}": v for k, v in sums.items()}, "tokens": float(tokens)}
        images = loaded_step.images
        if stage.hflip:  # the share of this step's images that were mirrored
            values["hflip_share"] = loaded_step.flipped / images
        if stage.shift:  # how far this step's images were moved, in pixels, on average
            values["shift_pixels"] = loaded_step.moved / images
        row = averaged(values, world, device)
        seconds = time.perf_counter() - started
        row.update(
            step=step + 1,
            total_steps=cfg.total_steps,
            epoch=epoch,
            workers=world,
            lr=lr,
            grad_norm=grad_norm,
            loss=sum(weights[k] * row[f"loss_{k}"] for k in kinds),
            samples_per_s=stage.batch_size / seconds,
            tokens_per_s=row["tokens"] * world / seconds,
        )
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(
                f"train {stage.name}: the loss is {row['loss']} at step {step + 1} "
                f"(lr {lr:.2e}, grad norm {grad_norm:.3g}): lower the learning rate or check the data"
            )
        if step == start and start > 0:
            row["resumed_from"] = start  # the driver says so on the console
        row["time"] = time.time()  # when the step ended: the MLflow point's timestamp
        if rank == 0:
            with open(history, "a") as handle:  # the driver reads it: MLflow curves, the console's progress
                handle.write(json.dumps(row) + "\n")
        done = step + 1 == cfg.total_steps
        if (step + 1) % stage.checkpoint_every == 0 or done:
            save_checkpoint(checkpoints, step + 1, wrapped, optimizer, scheduler, rank, stage.keep_last)
            ray.train.report({"step": step + 1, "loss": row["loss"]})
    state = final_weights(model, sharded, rank, lambda: build_stage_model(spec, vocab, stage, None, load_weights=False))
    if rank == 0:
        check_finite(state, stage.name)
        write_model_folder(out / "model", state, config, Path(cfg.tokenizer))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    (out / f"memory-rank{rank}.json").write_text(json.dumps({"start_rss": start_rss, "peak_rss": peak}))


def check_finite(state: dict, stage: str) -> None:
    """Refuse weights that hold NaN or inf (the last step's update can make them so after its
    loss was checked): such a model is never written, so never registered."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise FloatingPointError(f"train {stage}: the trained weights hold NaN or inf values ({shown}): not written")


def final_weights(model: torch.nn.Module, sharded: bool, rank: int, build: Callable[[], torch.nn.Module]) -> dict:
    """The trained model's plain weights (LoRA merged) on rank 0 ({} elsewhere). Sharded: every worker
    sends its shards (a collective), and rank 0 merges LoRA in a copy built on the meta device by
    `build` that takes the gathered tensors as its own (merging in the sharded model would be a
    collective that only rank 0 joins)."""
    if not sharded:
        return merge_lora(model) if rank == 0 else {}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    with torch.device("meta"):
        plain = build()
    plain.load_state_dict(full, strict=True, assign=True)
    return merge_lora(plain)


def memory_of(out: Path) -> dict[str, float]:
    """Resident memory of the busiest worker (MiB): at the loop's start, at its peak, and the growth."""
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("memory-rank*.json"))]
    if not rows:
        return {}
    busiest = max(rows, key=lambda r: r["peak_rss"] - r["start_rss"])
    mib = 1 << 20
    return {
        "worker_rss_start_mb": busiest["start_rss"] / mib,
        "worker_rss_peak_mb": busiest["peak_rss"] / mib,
        "worker_rss_growth_mb": (busiest["peak_rss"] - busiest["start_rss"]) / mib,
    }


def parse_row(line: str) -> dict | None:
    """A history line; None for the half-written last line of a killed run."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def averaged(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Losses averaged over workers; token counts summed then divided (per-worker mean)."""
    if world == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world).tolist(), strict=True))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,  # noqa: ANN001
    scheduler,  # noqa: ANN001
    rank: int,
    keep_last: int | None = None,
) -> None:
    """Every worker writes its part of the model and optimizer state into checkpoints/step-N (a
    collective: under FSDP its shards); once it is complete, rank 0 removes the checkpoints before
    the last `keep_last` (None: keeps all)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    folder = ckpt.step_folder(root, step)
    ckpt.save_state(folder, model_state, optim_state, scheduler.state_dict(), {"step": step}, rank)
    if rank == 0:
        ckpt.prune(root, keep_last)
    ckpt.barrier()


def resume(root: Path, model: torch.nn.Module, optimizer, scheduler) -> int:  # noqa: ANN001
    """Load the latest checkpoint into every worker, each its own part (on any number of workers,
    sharded or not, whatever wrote it); the step to continue from (0: none)."""
    folder = ckpt.latest(root)
    if folder is None:
        return 0
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state, scheduler_state, extra = ckpt.load_state(folder, model_state, optim_state)
    # Not strict: a trainable parameter without optimizer state (load_state) is not an error. Every model
    # tensor was read: dcp.load refuses a checkpoint without one of them.
    options = StateDictOptions(strict=False)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    scheduler.load_state_dict(scheduler_state)
    return int(extra["step"])
