"""`vlmflow evaluate SPEC --model REF`: the model to evaluate, brought into the artifact store as
a stage (`model`) so the recipe's evaluation stages read it like a training stage's output.

REF is a registered version (models:/NAME/VERSION, from the tracking server), or what
`vlmflow export` accepts: a model folder, a training stage's folder, a run folder or run id
(its last training stage), or a checkpoint folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmflow.components.export import resolve_model
from vlmflow.components.ingest import fingerprint
from vlmflow.components.train.setup import CONFIG_FILE, TOKENIZER_FILE
from vlmflow.errors import UserError
from vlmflow.stage import Stage, StageContext, StageResult
from vlmflow.tracking import download_model, tracking_uri

NAME = "model"


def is_registered(ref: str) -> bool:
    return ref.startswith("models:/")


def import_stage(ref: str, workdir: Path) -> Stage:
    """A stage whose artifact is `model/`, a copy of the model REF names."""
    local = None if is_registered(ref) else (Path(ref) if Path(ref).exists() else workdir / "runs" / ref)

    def spec(_recipe: object) -> dict:
        # A registered version is immutable; a folder is identified by its files' sizes and times.
        return {"ref": ref, "files": None if local is None else fingerprint(local.resolve())}

    def run(ctx: StageContext) -> StageResult:
        target = ctx.out / "model"
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

    return Stage(name=NAME, version="1", spec=spec, run=run)
