"""Checkpoints: every worker writes its own shard of the model and optimizer tensors as safetensors,
rank 0 the rest (step, scheduler, optimizer hyperparameters) as JSON.

The tensors go through torch.distributed.checkpoint (DCP) with its Hugging Face safetensors storage:
each worker writes the tensors it holds (under FSDP its DTensor shards; replicated tensors, as under DDP,
once, spread over the workers) into `shard-0000R-model-00001-of-00001.safetensors`, with each chunk's
offset in the global tensor in the file's safetensors header. There is no `.metadata` file: DCP's
default filesystem storage writes one with `pickle.dump` and reads it with `pickle.load`, while the
safetensors reader rebuilds the metadata from the files' JSON headers. So nothing is ever unpickled
and loading an untrusted checkpoint cannot run code. A checkpoint loads on any number of workers (DCP
reads each worker's part of every tensor from the chunks that overlap it) and without a process group
(`load_model_weights`: export, evaluation).

Nothing else differs between workers: the loop reseeds torch from (seed, step, rank) and the sample
order is a function of (seed, epoch), so the step is the data position and the RNG state.

Folders are written under a temporary name and renamed once every worker's files are written, so a
checkpoint that exists is complete; `prune` keeps the last N.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

STEP_PREFIX = "step-"
STATE_FILE = "state.json"
LEGACY_MODEL_FILE = "model.safetensors"  # before sharded checkpoints: rank 0's full model
MODEL, OPTIMIZER = "model", "optimizer"  # the tensors' key prefixes in the shard files


def save_state(folder: Path, model_state: dict, optim_state: dict, scheduler: dict, extra: dict, rank: int = 0) -> Path:
    """Write one checkpoint atomically; every worker calls it (a collective when distributed) with
    the state dicts `get_state_dict` gives it: DTensors under FSDP, whole tensors elsewhere."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors, plain = split_optimizer_state(optim_state)
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    quiet(dcp.save, {MODEL: model_state, OPTIMIZER: tensors}, storage_writer=writer)  # once all shards are written
    if rank == 0:
        meta = {"optimizer": plain, "scheduler": scheduler, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier()
    return folder


def load_state(folder: Path, model_state: dict, optim_state: dict) -> tuple[dict, dict, dict]:
    """Read a checkpoint into `model_state` and the optimizer's tensors in place, each worker its own
    part of every tensor whatever the number of workers that wrote it (both as `get_state_dict` gives
    them); returns (the optimizer state to set, scheduler state, extra)."""
    meta = json.loads((folder / STATE_FILE).read_text())
    reader = HuggingFaceStorageReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    # A trainable parameter that never got a gradient (e.g. the ViT layer after the feature layer)
    # has no optimizer state in the checkpoint: it gets none (as an uninterrupted run has none).
    tensors = {k: v for k, v in split_optimizer_state(optim_state)[0].items() if f"{OPTIMIZER}.{k}" in saved}
    quiet(dcp.load, {MODEL: model_state, OPTIMIZER: tensors}, storage_reader=HuggingFaceStorageReader(str(folder)))
    optimizer = join_optimizer_state(tensors, meta.pop("optimizer"))
    return optimizer, meta.pop("scheduler"), meta


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """A checkpoint's model weights into a plain (unsharded) model, in this process alone: no process
    group, whatever the number of workers that wrote it."""
    if (folder / LEGACY_MODEL_FILE).is_file():
        load_model(model, folder / LEGACY_MODEL_FILE)
        return
    state = model.state_dict()
    quiet(dcp.load, {MODEL: state}, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    model.load_state_dict(state, strict=True)


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state (keys: parameter names) -> flat tensors ("param/name") + JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {"param_groups": state["param_groups"], "scalars": {}}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value
            else:
                plain["scalars"][f"{param}/{name}"] = value
    return tensors, plain


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def quiet(call: Callable, *args: object, **kwargs: object) -> object:
    """A DCP call without its warning that, with no process group, it saves or loads in one process
    (what a single worker, export and evaluation mean to do)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is .* in a single process", UserWarning)
        return call(*args, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_checkpoint(folder: Path) -> bool:
    return folder.name.startswith(STEP_PREFIX) and (folder / STATE_FILE).is_file()


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()) if root.is_dir() else []


def latest(root: Path) -> Path | None:
    steps = checkpoints(root)
    return steps[-1] if steps else None


def prune(root: Path, keep_last: int | None) -> list[Path]:
    """Remove the checkpoints before the last `keep_last` (None: keep all); returns the removed ones.
    Called once a new checkpoint is complete, so the one a run resumed from goes only then. Each is
    renamed out of the `step-*` names first: a removal cut short never leaves a half checkpoint."""
    old = checkpoints(root)[:-keep_last] if keep_last else []
    for folder in old:
        doomed = folder.with_name(f".{folder.name}.removed")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
    return old


def step_folder(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def save_model(model: nn.Module, path: Path) -> None:
    """A plain model's weights (no adapters) as one safetensors file, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_model(model: nn.Module, path: Path) -> None:
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); did the model: section change between stages?"
        )
