"""The recipe flow: the stages of a recipe, each a Prefect task on Ray, each started as soon as the
stages it reads have finished (independent stages run at the same time). A run with nothing to
compute is recorded without a flow (`vlmflow.runtime.prefect.run_recipe`)."""

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
