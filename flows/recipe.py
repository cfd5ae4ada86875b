"""The recipe flow: the stages of a recipe, each a Prefect task on Ray, each started as soon as the
stages it reads have finished (independent stages run at the same time). A run with nothing to
compute is recorded without a flow (`run_recipe`)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.pipeline import recipe_graph
from vlmflow.plan import Plan
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs.recipe import Recipe


@flow(name="vlmflow-recipe", flow_run_name="{recipe.name}", validate_parameters=False, log_prints=True)
def recipe_flow(recipe: Recipe, workdir: Path, spec_path: str, plan: Plan | None = None) -> dict:
    with RecipeRun(recipe, workdir, spec_path, plan) as run:
        run.run_graph(recipe_graph(recipe))
    return run.summary


def run_recipe(recipe: Recipe, workdir: Path, spec_path: str, plan: Plan | None = None) -> dict:
    """The recipe flow; or, when the plan finds every stage cached, the same run recorded without
    a flow (summary.json and MLflow: every stage `cached`): no Prefect server, no Ray, seconds."""
    if plan is not None and plan.stages and all(entry.status == "cached" for entry in plan.stages):
        with RecipeRun(recipe, workdir, spec_path, plan) as run:
            run.run_graph(recipe_graph(recipe), sequential=True)
        return run.summary
    return recipe_flow(recipe, workdir, spec_path, plan)
