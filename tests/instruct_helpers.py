"""Shared by the instruct tests: a recipe with an `instruct:` section, an ingest artifact built
in process (run_stage on a LocalExecutor: no Ray), and the instruct step run into a fresh build
folder (its context's executor local too)."""

from __future__ import annotations

from pathlib import Path

from vlmflow.artifacts import ArtifactStore
from vlmflow.components import ingest
from vlmflow.components.instruct import COMPONENT as INSTRUCT
from vlmflow.components.instruct import stage as instruct_stage
from vlmflow.fingerprint import HashCache
from vlmflow.pipeline import Step, step_digest
from vlmflow.runtime.executor import LocalExecutor
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import StageContext, StageOutput, StageResult, run_stage


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


def _digest(step: Step, recipe: Recipe, inputs: dict[str, StageOutput]) -> str:
    digests = {port: out.digest for port, out in inputs.items()}
    return step_digest(step, recipe, digests, HashCache(None), recipe.spec_dir())


def ingest_step(recipe: Recipe) -> Step:
    return Step("ingest", ingest.COMPONENT, recipe.data.ingest(), {}, ("data",))


def instruct_step(recipe: Recipe, upstream: str = "ingest") -> Step:
    return Step("instruct", INSTRUCT, recipe.instruct, {"data": upstream}, ("instruct",))


def run_ingest(store: ArtifactStore, recipe: Recipe) -> StageOutput:
    """The ingest step, built (or found) in process."""
    step = ingest_step(recipe)
    digest = _digest(step, recipe, {})
    run_stage(step, digest, {}, recipe, store, "log", LocalExecutor())
    return StageOutput(step.name, digest, store.path(step.name, digest), store.stats(step.name, digest))


def instruct_context(store: ArtifactStore, recipe: Recipe, inputs: dict[str, StageOutput]) -> StageContext:
    """The instruct step's context; `inputs` holds its one data input (under any name: it is
    wired to the `data` port)."""
    (upstream,) = inputs.values()
    step = instruct_step(recipe, upstream.stage)
    ports = {"data": upstream}
    digest = _digest(step, recipe, ports)
    out = store.partial(step.name, digest)
    return StageContext(
        recipe, store, out, digest, ports, "log", step.config, step.name, step.field, executor=LocalExecutor()
    )


def run_instruct(store: ArtifactStore, recipe: Recipe, inputs: dict[str, StageOutput]) -> tuple[Path, StageResult]:
    ctx = instruct_context(store, recipe, inputs)
    result = instruct_stage.run(ctx)
    return ctx.out, result


def instruct_digest(recipe: Recipe, data_digest: str = "0" * 16) -> str:
    """The instruct step's cache key over a data input of digest `data_digest` (files hashed afresh)."""
    step = instruct_step(recipe)
    return step_digest(step, recipe, {"data": data_digest}, HashCache(None), recipe.spec_dir())
