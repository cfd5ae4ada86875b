"""The recipe flow: the stages of a recipe, in order, each a Prefect task on Ray."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.components import dedup, ingest, tokenize
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs.recipe import Recipe


@flow(name="vlmflow-recipe", flow_run_name="{recipe.name}", validate_parameters=False, log_prints=True)
def recipe_flow(recipe: Recipe, workdir: Path, spec_path: str) -> dict:
    with RecipeRun(recipe, workdir, spec_path) as run:
        data = {"ingest": run.stage(ingest.STAGE)}
        if recipe.data.dedup is not None:
            data["dedup"] = run.stage(dedup.STAGE, ingest=data["ingest"])
        if recipe.tokenizer is not None:
            run.stage(tokenize.STAGE, **data)
    return run.summary
