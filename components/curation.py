"""What the curation components (`clip-score`, `semdedup`, `decontaminate`) share: the model a
step names and how it embeds a data artifact's images and captions on the stage's executor, and
the filtered samples artifact they write.

A step's model is its `model` input (a training stage of the recipe that trains a text tower with
a contrastive objective: its `model/` folder) or `with: {model: FOLDER}`, a local folder: a
Hugging Face CLIP folder (`CLIPModel.save_pretrained` beside its tokenizer and
`preprocessor_config.json`) or a vlmflow model folder (`vlmflow_model.json`, a trained stage's
`model/`). Nothing is downloaded. The embedding work (`components/embedder.py`, torch) is
imported only when a step runs.

The output artifact references the input's shards (nothing is copied, as dedup does): its
manifest is the input's less the removed rows, `quarantine.parquet` holds every removed row with
its reason, `quarantine_summary.json` counts them by reason and source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import Field, field_validator

from vlmflow.component import Port, operational
from vlmflow.components import report
from vlmflow.samples import QUARANTINE_SCHEMA, write_tables
from vlmflow.specs.base import ExistingDir, Float, Int, StrictModel
from vlmflow.stage import StageContext

VLMFLOW_MODEL = "vlmflow_model.json"  # what a training stage's model/ folder holds


def is_hf_clip(folder: Path) -> bool:
    """A Hugging Face CLIP folder: config.json with model_type clip."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "clip"


class ModelStep(StrictModel):
    """The settings of a step that embeds with a model (see the module docstring)."""

    model: ExistingDir | None = Field(
        None,
        description="a local model folder: a Hugging Face CLIP folder (CLIPModel with its tokenizer and "
        "preprocessor_config.json) or a vlmflow model folder with a text tower; default: the step's `model` "
        "input, a training stage with an itc or siglip objective",
    )
    splits: list[str] = Field(
        default_factory=lambda: ["train"], min_length=1, description="the splits judged; other rows pass unchanged"
    )
    batch_size: Int = Field(64, ge=1, description="images per batch on an actor")
    actors: Int = operational(1, ge=1, description="actors, each loading the model once")
    cpus_per_actor: Float = operational(1, gt=0)
    gpus_per_actor: Float = Field(0, ge=0, description="> 0 embeds on CUDA")

    @field_validator("model")
    @classmethod
    def _a_model_folder(cls, folder: Path | None) -> Path | None:
        if folder is not None and not is_hf_clip(folder) and not (folder / VLMFLOW_MODEL).is_file():
            raise ValueError(
                f"{folder} is neither a Hugging Face CLIP folder (config.json with model_type clip) nor a vlmflow "
                f"model folder ({VLMFLOW_MODEL}): give a CLIP folder, a training stage's model/ folder, or wire "
                "the step's `model` input to a training stage"
            )
        return folder


def model_ports(config: ModelStep) -> dict[str, Port]:
    """`data`, and `model` unless the config names a folder."""
    ports = {"data": Port("samples")}
    if config.model is None:
        ports["model"] = Port("model", description="a CLIP-style training stage (itc or siglip)")
    return ports


def model_folder(ctx: StageContext) -> Path:
    return ctx.config.model if ctx.config.model is not None else ctx.inputs["model"].path / "model"


def judged(index: pl.DataFrame, splits: list[str]) -> pl.DataFrame:
    return index.filter(pl.col("split").is_in(splits))


def embed(ctx: StageContext, rows: pl.DataFrame, texts: list[str] | None, desc: str) -> np.ndarray:
    """Unit embeddings of the images of `rows` (index rows: shard, image_offset, image_size) or, with
    `texts` (one per row), the cosine of each image with its text: batches of `batch_size` on
    `actors` actors of the stage's executor, each loading the model once."""
    from vlmflow.components.embedder import Embedder

    spec: ModelStep = ctx.config
    ctx.executor.require_gpus(spec.gpus_per_actor, f"{ctx.name}.gpus_per_actor")
    where = rows.select("shard", "image_offset", "image_size").rows()
    batches: list[Any] = [where[i : i + spec.batch_size] for i in range(0, len(where), spec.batch_size)]
    if texts is not None:
        batches = [{"images": b, "texts": texts[i * spec.batch_size : (i + 1) * spec.batch_size]}
                   for i, b in enumerate(batches)]  # fmt: skip
    device = "cuda" if spec.gpus_per_actor > 0 else "cpu"
    init = (str(model_folder(ctx)), str(ctx.store.root), max(1, int(spec.cpus_per_actor)), device)
    method = "images" if texts is None else "pairs"
    out = ctx.executor.map_on_actors(
        Embedder, init, method, batches, desc=desc, num_actors=spec.actors, num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor, progress=ctx.progress,
    )  # fmt: skip
    return np.concatenate(out) if out else np.empty((0,) if texts is not None else (0, 0), np.float32)


def write_filtered(ctx: StageContext, manifest: pl.DataFrame, removed: pl.DataFrame) -> pl.DataFrame:
    """Write the artifact: the manifest less `removed` (key, reason, detail), the quarantine (with each
    row's source), the input's shards still referenced, the quarantine summary. Returns the quarantine."""
    quarantine = removed.join(manifest.select("key", "source"), on="key", how="left").select(list(QUARANTINE_SCHEMA))
    kept = manifest.filter(~pl.col("key").is_in(removed["key"].implode()))
    shards = pl.read_parquet(ctx.inputs["data"].path / "shards.parquet")
    shards = shards.filter(pl.col("shard").is_in(kept["shard"].unique().implode()))
    write_tables(ctx.out, kept, quarantine, shards)
    report.write_quarantine_summary(quarantine, ctx.out / "quarantine_summary.json")
    return quarantine


REMOVED_SCHEMA = {"key": pl.String, "reason": pl.String, "detail": pl.String}
