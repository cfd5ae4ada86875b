"""The training stage's Ray Train trainer: Ray's TorchTrainer less its PlacementGroupCleaner
(whose stop cost every training stage 13-18 s), everything else as Ray sets it up."""

from __future__ import annotations

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from vlmflow.components.train.stage import Trainer


def callbacks_of(cls: type, tmp_path) -> list[str]:
    trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=2),
                  run_config=RunConfig(name="t", storage_path=str(tmp_path)))  # fmt: skip
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_the_trainer_drops_only_the_placement_group_cleaner(tmp_path):
    ray_own, ours = callbacks_of(TorchTrainer, tmp_path), callbacks_of(Trainer, tmp_path)
    # If a Ray upgrade renames the callback or the hook, this fails rather than the cost coming back unseen.
    assert PlacementGroupCleanerCallback.__name__ in ray_own
    assert ours == [name for name in ray_own if name != PlacementGroupCleanerCallback.__name__]
    assert "BackendSetupCallback" in ours and "DatasetsCallback" in ours
