"""The recipe flow: the stages of a recipe, in order, each a Prefect task on Ray."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.graph import recipe_graph
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs.recipe import Recipe


@flow(name="vlmflow-recipe", flow_run_name="{recipe.name}", validate_parameters=False, log_prints=True)
def recipe_flow(recipe: Recipe, workdir: Path, spec_path: str, plan: dict | None = None) -> dict:
    with RecipeRun(recipe, workdir, spec_path, plan) as run:
        done = {}
        for node in recipe_graph(recipe):
            done[node.stage.name] = run.stage(node.stage, **{key: done[up] for key, up in node.inputs.items()})
    return run.summary
