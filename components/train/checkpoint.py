"""Checkpoints as safetensors (model, optimizer tensors) + JSON (step, scheduler, param groups).

Nothing is ever unpickled: a checkpoint folder holds only safetensors and JSON, so loading
an untrusted one cannot run code. Folders are written under a temporary name and renamed,
so a checkpoint that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEP_PREFIX = "step-"


def save_state(
    folder: Path, model_state: dict[str, torch.Tensor], optim_state: dict, scheduler: dict, extra: dict
) -> Path:
    """Write one checkpoint atomically (rank 0); returns its folder."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    tensors, plain = split_optimizer_state(optim_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"optimizer": plain, "scheduler": scheduler, **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(model state, optimizer state, scheduler state, extra) of a checkpoint folder."""
    meta = json.loads((folder / "state.json").read_text())
    model_state = load_file(str(folder / "model.safetensors"))
    optim_state = join_optimizer_state(load_file(str(folder / "optimizer.safetensors")), meta.pop("optimizer"))
    return model_state, optim_state, meta.pop("scheduler"), meta


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state (keys: parameter names) -> flat tensors + JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {"param_groups": state["param_groups"], "scalars": {}}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value.detach().contiguous().cpu()
            else:
                plain["scalars"][f"{param}/{name}"] = value
    return tensors, plain


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def latest(root: Path) -> Path | None:
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else None


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
