"""The recipe flow as a schedule or a work pool runs it (`schedule: {flow: recipe}`): plain-string
parameters, the spec read and planned again at every run, then the recipe flow as a subflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.errors import UserError
from vlmflow.specs import load_recipe
from vlmflow.specs.loader import located


@flow(name="vlmflow-scheduled-recipe", validate_parameters=False, log_prints=True)
def scheduled_recipe_flow(spec_path: str, workdir: str, overrides: list[str] | None = None) -> dict:
    from vlmflow.flows.recipe import recipe_flow
    from vlmflow.plan import build_plan, check

    recipe = load_recipe(spec_path, overrides or [])
    plan = build_plan(recipe, Path(workdir), cached_details=False)
    errors = [located(spec_path, overrides or [], e.field, e.message) for e in check(plan, running=True)]
    if errors:
        raise UserError("\n".join(str(e) for e in errors))
    return recipe_flow(recipe, Path(workdir), spec_path, plan)
