"""The evaluate flow: a recipe's evaluation tasks on a model from outside the recipe's training
(`vlmflow evaluate SPEC --model REF`): the data stages they read, the model imported as a stage,
then one eval-NAME stage per task (side by side once the model is in), tracked like a recipe run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.components.evaluate.model_import import import_step
from vlmflow.pipeline import evaluate_graph, recipe_graph
from vlmflow.plan import Plan
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs.recipe import Recipe


@flow(name="vlmflow-evaluate", flow_run_name="{recipe.name}", validate_parameters=False, log_prints=True)
def evaluate_flow(recipe: Recipe, workdir: Path, spec_path: str, model: str) -> dict:
    nodes = evaluate_graph(recipe_graph(recipe), import_step(model, workdir))
    tags = {"vlmflow.model": model}
    with RecipeRun(recipe, workdir, spec_path, Plan.empty(recipe, workdir), flow="evaluate", tags=tags) as run:
        run.run_graph(nodes)
    return run.summary
