"""The training stage's Ray Train trainer: Ray's TorchTrainer less its PlacementGroupCleaner (whose stop
cost every training stage 13-18 s), everything else as Ray sets it up. The private Ray names this uses
(components/train/stage.py: without_placement_group_cleaner) are checked here, so a Ray upgrade that
moves them fails this test rather than the cost coming back unseen or the import breaking a run."""

from __future__ import annotations

import inspect

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vlmflow.components.train import stage
from vlmflow.components.train.stage import Trainer, without_placement_group_cleaner


def callbacks_of(cls: type, tmp_path) -> list[str]:
    trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=2),
                  run_config=RunConfig(name="t", storage_path=str(tmp_path)))  # fmt: skip
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_the_trainer_drops_only_the_placement_group_cleaner(tmp_path):
    ray_own, ours = callbacks_of(TorchTrainer, tmp_path), callbacks_of(Trainer, tmp_path)
    # If a Ray upgrade renames the callback or the hook, this fails rather than the cost coming back unseen.
    assert "PlacementGroupCleanerCallback" in ray_own, f"Ray Train's default callbacks changed: {ray_own}"
    assert ours == [name for name in ray_own if name != "PlacementGroupCleanerCallback"]
    assert "BackendSetupCallback" in ours and "DatasetsCallback" in ours


def test_the_private_ray_names_live_in_one_function():
    """The private import is made in without_placement_group_cleaner alone (none at module level), and
    the hook it overrides is still the one Ray's trainer calls to build its callbacks."""
    module_source = inspect.getsource(stage)
    assert module_source.count("ray.train.v2._internal") == 1
    assert "ray.train.v2._internal" in inspect.getsource(without_placement_group_cleaner)
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "self._create_default_callbacks()" in inspect.getsource(DataParallelTrainer), (
        "Ray's trainer no longer builds its callbacks with _create_default_callbacks: re-check the "
        "PlacementGroupCleaner workaround (components/train/stage.py)"
    )
