"""The data-refresh flow: the data stages of a recipe (ingest -> dedup -> tokenizer -> instruct,
no training or evaluation), with an incremental ingest that builds only new or changed units and
a new manifest version that follows the previous one (components/refresh.py, vlmflow.versions).

Its parameters are plain strings so a schedule or a work pool can run it: the spec is read
again at every run, so edits to it apply from the next refresh. The stages are imported when
the flow runs: `vlmflow schedule` and `vlmflow deploy` import this module only to name the flow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow


def data_stages(recipe: Any, ingest: Any) -> list[tuple[Any, dict[str, str]]]:
    """The data side of `graph.recipe_graph`, ingest replaced: (stage, input -> upstream stage)."""
    from vlmflow.components import dedup, tokenize

    stages, data = [(ingest, {})], {"ingest": "ingest"}
    if recipe.data.dedup is not None:
        stages.append((dedup.STAGE, {"ingest": "ingest"}))
        data["dedup"] = "dedup"
    if recipe.tokenizer is not None:
        stages.append((tokenize.STAGE, dict(data)))
    if recipe.instruct is not None:
        from vlmflow.components.instruct import stage as instruct

        stages.append((instruct.STAGE, dict(data)))
    return stages


@flow(name="vlmflow-data-refresh", validate_parameters=False, log_prints=True)
def data_refresh_flow(spec_path: str, workdir: str, overrides: list[str] | None = None) -> dict:
    import polars as pl

    from vlmflow import versions
    from vlmflow.artifacts import ArtifactStore
    from vlmflow.components.refresh import Refresh
    from vlmflow.runtime.prefect import RecipeRun
    from vlmflow.specs import load_recipe

    recipe = load_recipe(spec_path, overrides or [])
    root = Path(workdir)
    last = versions.latest(root, recipe.name) or {}
    refresh = Refresh.plan(recipe, ArtifactStore(root.resolve() / "artifacts"), last.get("manifest"))
    links = {
        "vlmflow.previous_manifest": refresh.previous or "",
        "vlmflow.previous_run": last.get("mlflow_run_id") or "",
    }
    with RecipeRun(recipe, root, spec_path, refresh.plan_summary(), "data-refresh", links) as run:
        done = {}
        for stage, inputs in data_stages(recipe, refresh.stage):
            done[stage.name] = run.stage(stage, **{key: done[up] for key, up in inputs.items()})
        outcome = refresh.outcome(pl.read_parquet(done["ingest"].path / "manifest.parquet", columns=["key", "shard"]))
        entry = versions.record(root, run.summary, outcome)
        run.summary["manifest_version"] = entry
        run.tracker.log(
            run.parent_run,
            tags={"vlmflow.manifest": entry["manifest"]},
            metrics=outcome | {"version": entry["version"]},
        )
    return run.summary
