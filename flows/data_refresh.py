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


def data_steps(recipe: Any) -> list[Any]:
    """The steps of the recipe that need no model: none of them or their inputs writes a model
    (or metrics). The recipe's one ingest step is rebuilt incrementally by the refresh."""
    from vlmflow.pipeline import ancestors, recipe_graph

    steps = recipe_graph(recipe)
    by_name = {s.name: s for s in steps}
    return [
        s for s in steps
        if s.writes not in ("model", "metrics")
        and all(by_name[a].writes != "model" for a in ancestors(steps, {s.name}))
    ]  # fmt: skip


@flow(name="vlmflow-data-refresh", validate_parameters=False, log_prints=True)
def data_refresh_flow(spec_path: str, workdir: str, overrides: list[str] | None = None) -> dict:
    import polars as pl

    from vlmflow import versions
    from vlmflow.artifacts import ArtifactStore
    from vlmflow.components.ingest import COMPONENT as INGEST
    from vlmflow.components.refresh import Refresh
    from vlmflow.errors import UserError
    from vlmflow.runtime.prefect import RecipeRun
    from vlmflow.specs import load_recipe

    recipe = load_recipe(spec_path, overrides or [])
    root = Path(workdir)
    last = versions.latest(root, recipe.name) or {}
    steps = data_steps(recipe)
    ingests = [s for s in steps if s.component is INGEST]
    if len(ingests) != 1:
        raise UserError(f"a data refresh rebuilds one ingest step; this recipe has {len(ingests)}")
    refresh = Refresh.plan(recipe, ingests[0], ArtifactStore(root.resolve() / "artifacts"), last.get("manifest"))
    links = {
        "vlmflow.previous_manifest": refresh.previous or "",
        "vlmflow.previous_run": last.get("mlflow_run_id") or "",
    }
    with RecipeRun(recipe, root, spec_path, refresh.plan_summary(), "data-refresh", links) as run:
        done = run.run_graph([refresh.step(s) if s is ingests[0] else s for s in steps])
        manifest = done[ingests[0].name].path / "manifest.parquet"
        outcome = refresh.outcome(pl.read_parquet(manifest, columns=["key", "shard"]))
        entry = versions.record(root, run.summary, outcome)
        run.summary["manifest_version"] = entry
        run.tracker.log(
            run.parent_run,
            tags={"vlmflow.manifest": entry["manifest"]},
            metrics=outcome | {"version": entry["version"]},
        )
    return run.summary
