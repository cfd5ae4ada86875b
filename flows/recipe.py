"""The recipe flow: the stages of a recipe, in order, each a Prefect task on Ray."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from vlmflow.components import dedup, ingest, tokenize
from vlmflow.components.instruct import stage as instruct
from vlmflow.components.train.stage import data_inputs, stage_for
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs.recipe import Recipe


@flow(name="vlmflow-recipe", flow_run_name="{recipe.name}", validate_parameters=False, log_prints=True)
def recipe_flow(recipe: Recipe, workdir: Path, spec_path: str) -> dict:
    with RecipeRun(recipe, workdir, spec_path) as run:
        data = {"ingest": run.stage(ingest.STAGE)}
        if recipe.data.dedup is not None:
            data["dedup"] = run.stage(dedup.STAGE, ingest=data["ingest"])
        if recipe.tokenizer is not None:
            tokenizer = run.stage(tokenize.STAGE, **data)
        if recipe.instruct is not None:
            data["instruct"] = run.stage(instruct.STAGE, **data)
        trained: dict = {}
        for i, stage in enumerate(recipe.stages):
            start = list(trained.values())[-1:] if stage.init_from == "previous" else [trained.get(stage.init_from)]
            init = {"init": start[0]} if start and start[0] is not None else {}
            inputs = {key: data[name] for key, name in data_inputs(stage).items()}
            trained[stage.name] = run.stage(stage_for(recipe, i), tokenizer=tokenizer, **inputs, **init)
    return run.summary
