"""The explicit form of a recipe's graph: `pipeline:`, a list of named steps."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from vlmflow.specs.base import StrictModel

STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StepSpec(StrictModel):
    """One step: `uses` names a component (a registered name such as `dedup`, or
    `package.module:NAME` for a plugin), `with` holds its config (validated by the component's
    config model) and `inputs` wires each of the component's input ports to an upstream step."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=STEP_NAME, description="the step's name: its artifact folder and MLflow run")
    uses: str = Field(min_length=1, description="the component: a registered name or package.module:NAME")
    inputs: dict[str, str] = Field(default_factory=dict, description="input port -> upstream step name")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the component's config")
