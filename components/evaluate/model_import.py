"""`vlmflow evaluate SPEC --model REF`: the model to evaluate, brought into the artifact store as
a stage (`model`) so the recipe's evaluation stages read it like a training stage's output.

REF is a registered version (models:/NAME/VERSION, from the tracking server), or what
`vlmflow export` accepts: a model folder, a training stage's folder, a run folder or run id
(its last training stage), or a checkpoint folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmflow.component import Component
from vlmflow.errors import UserError
from vlmflow.pipeline import Step
from vlmflow.specs.base import StrictModel
from vlmflow.stage import StageContext, StageResult

NAME = "model"


def is_registered(ref: str) -> bool:
    return ref.startswith("models:/")


class ModelImportSpec(StrictModel):
    """The model `vlmflow evaluate --model` evaluates: `ref` as given; `path` the local file or
    folder it names (its content is in the cache key; a registered version is immutable)."""

    ref: str
    path: Path | None = None


def run(ctx: StageContext) -> StageResult:
    from vlmflow.components.export import resolve_model  # torch and transformers: imported on use
    from vlmflow.components.train.setup import CONFIG_FILE, TOKENIZER_FILE
    from vlmflow.tracking import download_model, tracking_uri

    ref, target = ctx.config.ref, ctx.out / "model"
    if is_registered(ref):
        tracking = tracking_uri(ctx.store.root.parent, ctx.recipe.runtime.mlflow.tracking_uri)
        folder = download_model(ref, tracking, ctx.out / "_download")
        for name in (CONFIG_FILE, TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise UserError(f"{ref}: the registered version has no {name}: not a complete vlmflow model folder")
        shutil.move(str(folder), target)
        shutil.rmtree(ctx.out / "_download", ignore_errors=True)
    else:
        with resolve_model(ref, ctx.store.root.parent) as folder:
            shutil.copytree(folder, target)
    return StageResult(rows_in=1, rows_out=1, rows_quarantined=0, details={"model": ref})


COMPONENT = Component(
    name="model-import",
    config=ModelImportSpec,
    writes="model",
    run=run,
    description="a model from outside the recipe: a registered version, a model, run or checkpoint folder",
)


def import_step(ref: str, workdir: Path) -> Step:
    """The step whose artifact `model/` is a copy of the model REF names."""
    local = None if is_registered(ref) else (Path(ref) if Path(ref).exists() else workdir / "runs" / ref)
    return Step(NAME, COMPONENT, ModelImportSpec(ref=ref, path=None if local is None else local.resolve()))
