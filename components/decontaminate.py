"""`decontaminate`: quarantine the training samples whose image is an exact or near duplicate of an
evaluation image, so that no evaluation score is earned on a training image.

Evaluation sets: the data artifact's own held-out splits (`held_out`, each set named after its
split; their fingerprints come from the manifest) and evaluation datasets (`datasets`, each with
a name: COCO captions, VQAv2, multiple-choice JSONL or TSV, image folders of classes), read
through the evaluation readers (`components/evaluate/datasets.py`: the same containment and size
rules; an image they cannot read is counted, not matched). Every distinct image is fingerprinted
as ingest fingerprints the training images (`vlmflow.images.check_image`).

A training row (of `splits`) matches an evaluation image:
- exactly: the same `pixel_sha256`, the sha256 of the decoded RGB pixels and their size (so a
  re-encoding that keeps the pixels, PNG to BMP, is exact; a resized or JPEG-recompressed copy is not);
- nearly: perceptual hashes within `hamming_threshold` bits of 64 and 8x8 thumbnails within
  `max_color_difference` mean |RGB| (pHash is colour-blind), as dedup judges near duplicates;
  candidates from the same pigeonhole bands (`dedup.band_masks`), so no pair is missed.
The training rows are matched in chunks on the stage's executor. A matched row is quarantined as
`eval-contamination:SET`, SET the first set it matches (exact before near, then the sets in the
order given: held-out splits first); the detail names the match and the evaluation image.

Output: the filtered samples artifact and `contamination.parquet` (key, set, id, match, distance,
color: every match, also of a row's other sets); metrics `decontaminate/SET` (the training rows
matching SET), `contaminated`, `exact`, `near`; details: the images of each set, those unreadable.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from vlmflow.component import Component, Port
from vlmflow.components.curation import REMOVED_SCHEMA, write_filtered
from vlmflow.components.dedup import band_masks
from vlmflow.images import CheckedImage, check_image
from vlmflow.specs.base import Float, Int, StrictModel
from vlmflow.specs.data import NAME_PATTERN
from vlmflow.specs.evaluate import ChoiceJsonl, ChoiceTsv, CocoCaptionsData, ImageFolderClasses, VqaData
from vlmflow.stage import StageContext, StageResult

CHUNK_ROWS = 1 << 18  # training rows matched per map unit
HASH_BATCH = 256  # evaluation images fingerprinted per map unit
PRINTS = {"set": pl.String, "id": pl.String, "pixel_sha256": pl.String, "phash": pl.UInt64, "thumb": pl.Binary}
MATCHES = {
    "key": pl.String,
    "set": pl.String,
    "id": pl.String,
    "match": pl.String,
    "distance": pl.Int64,
    "color": pl.Float64,
}


class EvalSet(StrictModel):
    """An evaluation dataset whose images no training sample may copy."""

    name: str = Field(pattern=NAME_PATTERN, description="the set's name in reasons and metrics")
    data: Annotated[
        CocoCaptionsData | VqaData | ImageFolderClasses | ChoiceJsonl | ChoiceTsv, Field(discriminator="kind")
    ]


class DecontaminateSpec(StrictModel):
    """Quarantine training samples whose image matches an evaluation image exactly (decoded pixels) or
    nearly (perceptual hash and colour, as dedup)."""

    held_out: list[Literal["val", "test"]] = Field(
        default_factory=lambda: ["val", "test"], description="the data's own held-out splits, each an evaluation set"
    )
    datasets: list[EvalSet] = Field(default_factory=list, description="evaluation datasets, as `evaluate` reads them")
    splits: list[str] = Field(
        default_factory=lambda: ["train"], min_length=1, description="the splits checked; other rows pass unchanged"
    )
    exact: bool = Field(True, description="match identical decoded pixels")
    near: bool = Field(True, description="match perceptual hashes within hamming_threshold")
    hamming_threshold: Int = Field(4, ge=0, le=16, description="largest pHash distance (bits of 64) of a near match")
    max_color_difference: Float = Field(
        6.0, ge=0.0, le=255.0, description="a near match also differs by at most this mean |RGB| on 8x8 thumbnails"
    )

    @model_validator(mode="after")
    def _check(self) -> DecontaminateSpec:
        names = [*self.held_out, *(s.name for s in self.datasets)]
        if not names:
            raise ValueError("give an evaluation set: held_out splits, datasets or both")
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"evaluation set names must be unique (held-out splits included): {repeated}")
        if both := sorted(set(self.held_out) & set(self.splits)):
            raise ValueError(f"split(s) {both} are both checked and held out")
        if not (self.exact or self.near):
            raise ValueError("match exact, near or both")
        return self


def eval_images(data: EvalSet) -> tuple[list[tuple[str, bytes]], int]:
    """(id, bytes) of each distinct image of an evaluation dataset (the first item's id), and how
    many of its items the reader could not use (unreadable, missing, outside the folder...)."""
    from vlmflow.components.evaluate import datasets

    spec, rules = data.data, datasets.ImageFiles.of(data.data)
    if spec.kind == "coco-captions":
        loaded = datasets.coco_captions(spec.annotations, spec.images, None, rules)
    elif spec.kind == "vqav2":
        loaded = datasets.vqav2(spec.questions, spec.annotations, spec.images, spec.image_pattern, None, rules)
    elif spec.kind == "image-folder":
        loaded = datasets.image_folder(spec.path, None, rules)[0]
    elif spec.kind == "multiple-choice-tsv":
        loaded = datasets.choice_tsv(spec.path, None, rules)
    else:
        loaded = datasets.choice_jsonl(spec.path, spec.images, None, rules)
    distinct: dict[str, tuple[str, bytes]] = {}
    for item in loaded.items:
        distinct.setdefault(hashlib.sha256(item.image).hexdigest(), (item.id, item.image))
    return list(distinct.values()), len(loaded.quarantine)


def fingerprint(unit: tuple[str, list[tuple[str, bytes]]]) -> list[dict]:
    """The fingerprints of a batch of one set's images (a map unit)."""
    name, images = unit
    rows = []
    for id_, data in images:
        image = check_image(data)
        if isinstance(image, CheckedImage):  # the readers verified the bytes decode
            rows.append({"set": name, "id": id_, "pixel_sha256": image.pixel_sha256, "phash": image.phash,
                         "thumb": image.thumb})  # fmt: skip
    return rows


def _bands(frame: pl.DataFrame, masks: list[tuple[int, int]], columns: list[str]) -> pl.DataFrame:
    hashes = frame["phash"].to_numpy().astype(np.uint64)
    return pl.concat(
        [
            frame.select(columns).with_columns(
                band=pl.lit(b, pl.Int16), value=pl.Series((hashes >> np.uint64(shift)) & np.uint64(mask))
            )
            for b, (shift, mask) in enumerate(masks)
        ]
    )


def matches(train: pl.DataFrame, prints: pl.DataFrame, spec: DecontaminateSpec) -> pl.DataFrame:
    """Every (training key, set, id) match of training rows (key, pixel_sha256, phash, thumb) with
    evaluation fingerprints (PRINTS): `exact` (distance 0, color 0) or `near` (within both limits)."""
    found = []
    if spec.exact:
        exact = train.select("key", "pixel_sha256").join(prints.select("set", "id", "pixel_sha256"), on="pixel_sha256")
        found.append(exact.select("key", "set", "id", match=pl.lit("exact"), distance=0, color=0.0))
    if spec.near:
        masks = band_masks(spec.hamming_threshold)
        pairs = _bands(train, masks, ["key"]).join(_bands(prints, masks, ["set", "id"]), on=["band", "value"])
        pairs = pairs.select("key", "set", "id").unique()
        pairs = pairs.join(train.select("key", "phash", "thumb", "pixel_sha256"), on="key").join(
            prints.select("set", "id", "phash", "thumb", "pixel_sha256"), on=["set", "id"], suffix="_eval"
        )
        xor = pairs["phash"].to_numpy().astype(np.uint64) ^ pairs["phash_eval"].to_numpy().astype(np.uint64)
        thumbs = [np.stack([np.frombuffer(t, np.uint8) for t in pairs[c]]).astype(np.int16) if pairs.height
                  else np.empty((0, 1), np.int16) for c in ("thumb", "thumb_eval")]  # fmt: skip
        pairs = pairs.with_columns(
            distance=pl.Series(np.bitwise_count(xor).astype(np.int64)),
            color=pl.Series(np.abs(thumbs[0] - thumbs[1]).mean(axis=1).astype(np.float64)),
        )
        near = pairs.filter(
            (pl.col("distance") <= spec.hamming_threshold) & (pl.col("color") <= spec.max_color_difference)
        )
        if spec.exact:  # an exact match is not a near one too
            near = near.filter(pl.col("pixel_sha256") != pl.col("pixel_sha256_eval"))
        found.append(near.select("key", "set", "id", match=pl.lit("near"), distance="distance", color="color"))
    return pl.concat([f.cast(MATCHES) for f in found]) if found else pl.DataFrame(schema=MATCHES)


def first_matches(found: pl.DataFrame, order: list[str]) -> pl.DataFrame:
    """One quarantine row (key, reason, detail) per matched training key: its first match (exact
    before near, then the sets in `order`, then the smallest distance and id)."""
    rank = pl.col("set").replace_strict(order, list(range(len(order))), return_dtype=pl.Int64)
    first = found.sort([pl.col("match") != "exact", rank, "distance", "id"]).unique("key", keep="first")
    how = pl.when(pl.col("match") == "exact").then(pl.lit("identical pixels"))
    how = how.otherwise(pl.format("phash distance {}", "distance"))
    return first.sort("key").select(
        "key",
        pl.format("eval-contamination:{}", "set").alias("reason"),
        pl.format("{}: {} to {} image {}", "match", how, "set", "id").alias("detail"),
    )


def run(ctx: StageContext) -> StageResult:
    spec: DecontaminateSpec = ctx.config
    manifest = pl.read_parquet(ctx.inputs["data"].path / "manifest.parquet")
    held = manifest.filter(pl.col("split").is_in(spec.held_out))
    prints = [held.select(set="split", id="key", pixel_sha256="pixel_sha256", phash="phash", thumb="thumb")]
    images: dict[str, int] = {s: held.filter(pl.col("split") == s).height for s in spec.held_out}
    unreadable: dict[str, int] = dict.fromkeys(spec.held_out, 0)
    units = []
    for data in spec.datasets:
        found, unreadable[data.name] = eval_images(data)
        images[data.name] = len(found)
        units += [(data.name, found[i : i + HASH_BATCH]) for i in range(0, len(found), HASH_BATCH)]
    hashed = ctx.executor.map_units(fingerprint, units, desc=f"{ctx.name} eval images", progress=ctx.progress)
    prints.append(pl.DataFrame([r for part in hashed for r in part], schema=PRINTS, orient="row"))
    evals = pl.concat([p.cast(PRINTS) for p in prints])
    train = manifest.filter(pl.col("split").is_in(spec.splits)).select("key", "pixel_sha256", "phash", "thumb")
    chunks = [train.slice(i, CHUNK_ROWS) for i in range(0, train.height, CHUNK_ROWS)]
    parts = ctx.executor.map_units(matches, chunks, desc=f"{ctx.name} match", args=(evals, spec),
                                   progress=ctx.progress)  # fmt: skip
    found = pl.concat([pl.DataFrame(schema=MATCHES), *parts]).sort("key", "set", "id")
    found.write_parquet(ctx.out / "contamination.parquet")
    order = [*spec.held_out, *(s.name for s in spec.datasets)]
    quarantine = write_filtered(ctx, manifest, first_matches(found, order).cast(REMOVED_SCHEMA))
    per_set = {name: found.filter(pl.col("set") == name)["key"].n_unique() for name in order}
    kinds = quarantine["detail"].str.split(":").list.first().value_counts().rows() if quarantine.height else []
    return StageResult(
        rows_in=manifest.height,
        rows_out=manifest.height - quarantine.height,
        rows_quarantined=quarantine.height,
        metrics={f"decontaminate/{name}": float(n) for name, n in per_set.items()}
        | {"contaminated": float(quarantine.height), "exact": 0.0, "near": 0.0}
        | {kind: float(n) for kind, n in kinds},
        artifacts=["contamination.parquet", "quarantine.parquet", "quarantine_summary.json"],
        details={"eval_images": images, "eval_unreadable": unreadable},
    )


COMPONENT = Component(
    name="decontaminate",
    config=DecontaminateSpec,
    reads={"data": Port("samples")},
    writes="samples",
    run=run,
    description="quarantine training samples whose image is an exact or near duplicate of an evaluation image "
    "(held-out splits, evaluation datasets) as eval-contamination:SET",
)
