"""Shared by the instruct tests: a recipe with an `instruct:` section, an ingest artifact built
in process (no Ray), and the instruct stage run into a fresh build folder."""

from __future__ import annotations

from pathlib import Path

from vlmflow.artifacts import ArtifactStore, stage_digest
from vlmflow.components import ingest
from vlmflow.components.instruct import stage as instruct_stage
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import StageContext, StageOutput, StageResult


def make_recipe(spec_dir: Path, instruct: dict | None = None, sources: list | None = None, **data: object) -> Recipe:
    raw = {
        "name": "instruct-test",
        "seed": 5,
        "data": {
            "sources": sources
            or [{"kind": "synthetic-shapes", "name": "shapes", "count": 60, "max_objects": 5, "test_fraction": 0.1}],
            "shard_size": 25,
            **data,
        },
        "instruct": instruct if instruct is not None else {},
    }
    return Recipe.model_validate(raw, context={"spec_dir": spec_dir, "allow_outside_paths": True})


def _serial(fn, units, *, desc, args=(), **_kw):
    return [fn(unit, *args) for unit in units]


def run_ingest(store: ArtifactStore, recipe: Recipe, monkeypatch) -> StageOutput:
    """The ingest stage, its Ray map replaced by a loop."""
    monkeypatch.setattr(ingest, "map_units", _serial)
    digest = stage_digest("ingest", ingest.stage_spec(recipe), [], ingest.VERSION)
    if not store.is_complete("ingest", digest):
        ctx = StageContext(recipe, store, store.partial("ingest", digest), digest, {}, "log")
        result = ingest.run(ctx)
        store.commit("ingest", digest, result.stats(0.0))
    return StageOutput("ingest", digest, store.path("ingest", digest), store.stats("ingest", digest))


def instruct_context(store: ArtifactStore, recipe: Recipe, inputs: dict[str, StageOutput]) -> StageContext:
    digest = stage_digest(
        "instruct",
        instruct_stage.stage_spec(recipe),
        [inputs[k].digest for k in sorted(inputs)],
        instruct_stage.VERSION,
    )
    return StageContext(recipe, store, store.partial("instruct", digest), digest, inputs, "log")


def run_instruct(store: ArtifactStore, recipe: Recipe, inputs: dict[str, StageOutput]) -> tuple[Path, StageResult]:
    ctx = instruct_context(store, recipe, inputs)
    result = instruct_stage.run(ctx)
    return ctx.out, result
