"""Staged training: data from shards, the per-worker loop on Ray Train, checkpoints, stage wiring.

This module declares the `train` component; its work (`stage.run`, on Ray Train and torch) and
its plan (`plan.plan_step`) are imported only when a training step runs or is planned."""

from __future__ import annotations

from vlmflow.component import Component, Port
from vlmflow.specs.train import TrainStageSpec


def stage_name(spec: TrainStageSpec | str) -> str:
    """The step of a training stage spec (or of the stage with that name) in the concise form."""
    return f"train-{spec if isinstance(spec, str) else spec.name}"


def data_inputs(spec: TrainStageSpec) -> dict[str, str]:
    """Input name -> data artifact: `data` for one artifact, `data.NAME` for each of several."""
    names = spec.artifacts()
    return {"data": names[0]} if len(names) == 1 else {f"data.{name}": name for name in names}


def ports(spec: TrainStageSpec) -> dict[str, Port]:
    """tokenizer, the data (`data`, or `data.NAME` per artifact of a mixture) and `init`, the
    model it starts from (unwired: fresh weights)."""
    data = {key: Port("samples") for key in data_inputs(spec)}
    return {"tokenizer": Port("tokenizer"), **data, "init": Port("model", optional=True)}


COMPONENT = Component(
    name="train",
    config=TrainStageSpec,
    reads=ports,
    writes="model",
    run="vlmflow.components.train.stage:run",
    recipe_fields=("seed", "model", "runtime.train.num_workers", "runtime.train.use_gpu", "runtime.train.strategy"),
    plan="vlmflow.components.train.plan:plan_step",
    description="a training stage: Ray Train over its data mixture, then held-out checks",
)
