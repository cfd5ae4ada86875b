"""Checkpoints in one process (no process group): the training loop's save_checkpoint / resume round
trip is exact, nothing in a checkpoint is unpickled, and keep_last removes old checkpoints only once a
newer one is complete. Sharded checkpoints over several ranks: tests/integration/test_fsdp.py."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from pydantic import ValidationError

from vlmflow.component import digest_view
from vlmflow.components.train import checkpoint as ckpt
from vlmflow.components.train import loop
from vlmflow.specs.train import TrainStageSpec


def trainer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(loop.param_groups(list(model.parameters()), 0.1), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: range) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = trainer(0)
    train(model, optimizer, scheduler, range(3))
    loop.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, rank=0)
    clean = train(model, optimizer, scheduler, range(3, 8))
    folder = ckpt.step_folder(tmp_path, 3)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00001-model-00001-of-00001.safetensors", "state.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left

    fresh, fresh_optimizer, fresh_scheduler = trainer(1)  # other initial weights: all must come from the checkpoint
    assert loop.resume(tmp_path, fresh, fresh_optimizer, fresh_scheduler) == 3
    assert fresh_scheduler.last_epoch == 3 and fresh_optimizer.param_groups[0]["weight_decay"] == 0.1
    assert train(fresh, fresh_optimizer, fresh_scheduler, range(3, 8)) == clean


def test_the_model_weights_of_a_checkpoint_load_alone(tmp_path):
    model, optimizer, scheduler = trainer(0)
    train(model, optimizer, scheduler, range(2))
    loop.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, rank=0)
    other = trainer(1)[0]
    ckpt.load_model_weights(other, ckpt.step_folder(tmp_path, 2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_nothing_in_a_checkpoint_is_unpickled(tmp_path, monkeypatch):
    """DCP's default storage would read a pickled `.metadata`; the safetensors reader never opens one."""
    monkeypatch.chdir(tmp_path)
    model, optimizer, scheduler = trainer(0)
    train(model, optimizer, scheduler, range(2))
    loop.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, rank=0)
    folder = ckpt.step_folder(tmp_path, 2)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert loop.resume(tmp_path, *trainer(1)) == 2  # loads, ignoring it
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(pickle.dumps({"model.0.weight": Payload()}))
    with pytest.raises(Exception) as caught:
        loop.resume(tmp_path, *trainer(1))
    assert "safetensors" in type(caught.value).__module__ or "header" in str(caught.value).lower(), caught.value
    legacy = tmp_path / "legacy"  # a checkpoint from before sharding: rank 0's model.safetensors
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing runs
        ckpt.load_model_weights(torch.nn.Linear(1, 1), legacy)
    assert not (tmp_path / "PWNED").exists()


def steps_in(root) -> list[int]:
    return [int(p.name.removeprefix(ckpt.STEP_PREFIX)) for p in ckpt.checkpoints(root)]


def test_keep_last_removes_older_checkpoints_once_a_newer_one_is_complete(tmp_path):
    model, optimizer, scheduler = trainer(0)
    kept = []
    for step in range(1, 6):
        train(model, optimizer, scheduler, range(step - 1, step))
        loop.save_checkpoint(tmp_path, step, model, optimizer, scheduler, rank=0, keep_last=2)
        kept.append(steps_in(tmp_path))
    assert kept == [[1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert not list(tmp_path.glob(".*"))

    class Unwritable:  # a scheduler whose state cannot be written: the checkpoint fails after its shards
        def state_dict(self) -> dict:
            return {"lr_lambdas": [object()]}

    with pytest.raises(TypeError):
        loop.save_checkpoint(tmp_path, 6, model, optimizer, Unwritable(), rank=0, keep_last=1)
    assert steps_in(tmp_path) == [4, 5]  # the incomplete one removed nothing, and is not a checkpoint
    assert loop.resume(tmp_path, *trainer(1)) == 5
    loop.save_checkpoint(tmp_path, 6, model, optimizer, scheduler, rank=0, keep_last=1)
    assert steps_in(tmp_path) == [6] and not list(tmp_path.glob(".*"))


def test_default_keeps_every_checkpoint(tmp_path):
    model, optimizer, scheduler = trainer(0)
    for step in (1, 2, 3):
        loop.save_checkpoint(tmp_path, step, model, optimizer, scheduler, rank=0)
    assert steps_in(tmp_path) == [1, 2, 3]


def test_keep_last_is_at_least_one_and_leaves_the_cache_key_alone():
    base = {"name": "s", "trainable": ["connector"], "objectives": [{"kind": "lm"}]}
    assert TrainStageSpec(**base).keep_last is None
    with pytest.raises(ValidationError, match="keep_last"):
        TrainStageSpec(**base, keep_last=0)
    # what is kept does not change the trained model: no retraining when it changes
    assert digest_view(TrainStageSpec(**base, keep_last=3)) == digest_view(TrainStageSpec(**base))
    assert json.dumps(digest_view(TrainStageSpec(**base))).count("keep_last") == 0
