"""Ingest: every source's rows -> checked, filtered samples in WebDataset shards.

One Ray task per unit (one unit = one output shard). A unit writes its shard atomically,
then its manifest and quarantine rows; a unit whose rows are on disk is reused when a
killed run resumes. The merge accounts for every input row: rows_in = out + quarantined.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from vlmflow.artifacts import atomic_path
from vlmflow.component import Component
from vlmflow.components import report
from vlmflow.components.filters import first_failure
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext, Unit, safe_key
from vlmflow.images import BadImage, check_image, sha256_bytes
from vlmflow.samples import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, SHARDS_SCHEMA, write_shard, write_tables
from vlmflow.specs.data import IngestSpec, source_name
from vlmflow.stage import StageContext, StageResult


def unit_name(unit: Unit) -> str:
    return f"{unit.source}-{unit.index:06d}"


def sample_record(key: str, source: str, split: str, row: RawRow) -> dict:
    return {"key": key, "source": source, "split": split, "captions": row.captions, "label": row.label, **row.extra}


def manifest_row(key: str, shard: str, split: str, ctx: SourceContext, row: RawRow, image: object) -> dict:
    truth = row.extra.get("truth") or {}
    caption = row.captions[0] if row.captions else None
    return {
        "key": key,
        "shard": shard,
        "sha256": sha256_bytes(image.data),
        "pixel_sha256": image.pixel_sha256,
        "phash": image.phash,
        "thumb": image.thumb,
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
        "ext": image.ext,
        "source": ctx.name,
        "split": split,
        "caption": caption,
        "captions": row.captions,
        "n_captions": len(row.captions),
        "caption_chars": len(caption) if caption is not None else 0,
        "label": row.label,
        "n_objects": len(row.extra.get("objects", [])),
        "n_qa": len(row.extra.get("qa", [])),
        "n_turns": len(row.extra.get("conversations", [])),
        "caption_corrupted": truth.get("corrupted"),
    }


def process_unit(work: tuple, filters: list, out_dir: str, shard_prefix: str, name: str | None = None) -> dict:
    """Read, check, filter and shard one unit; write its manifest and quarantine rows (files
    named `name`, default SOURCE-INDEX)."""
    spec, ctx, unit = work
    out = Path(out_dir)
    name = name or unit_name(unit)
    shard_rel = f"{shard_prefix}/{name}.tar"
    samples, manifest, quarantine, seen = [], [], [], set()
    for item in SOURCES.get(spec.kind).read(spec, ctx, unit):
        key = f"{ctx.name}-{safe_key(item.key)}"
        if isinstance(item, Rejected):
            quarantine.append({"key": key, "source": ctx.name, "reason": item.reason, "detail": item.detail})
            continue
        image = check_image(item.image) if item.image is not None else BadImage("no-image", "the row has no image")
        verdict = (image.reason, image.detail) if isinstance(image, BadImage) else first_failure(filters, item, image)
        if verdict is None and key in seen:
            verdict = ("duplicate-key", f"key {key} appears twice in the source")
        if verdict is not None:
            quarantine.append({"key": key, "source": ctx.name, "reason": verdict[0], "detail": verdict[1]})
            continue
        seen.add(key)
        split = item.split or spec.split
        samples.append({"__key__": key, image.ext: image.data, "json": sample_record(key, ctx.name, split, item)})
        manifest.append(manifest_row(key, shard_rel, split, ctx, item, image))
    shard = {"shard": shard_rel, "sha256": None, "bytes": 0, "samples": len(samples)}
    if samples:
        shard["sha256"], shard["bytes"] = write_shard(out / "shards" / f"{name}.tar", samples)
    _write_parquet(out / "units" / f"{name}.quarantine.parquet", quarantine, QUARANTINE_SCHEMA)
    with atomic_path(out / "units" / f"{name}.shard.json") as tmp:
        tmp.write_text(json.dumps(shard))
    _write_parquet(out / "units" / f"{name}.manifest.parquet", manifest, MANIFEST_SCHEMA)  # last: marks done
    return {"unit": name, "rows": len(manifest) + len(quarantine)}


def _write_parquet(path: Path, rows: list[dict], schema: dict) -> None:
    with atomic_path(path) as tmp:
        pl.DataFrame(rows, schema=schema, orient="row").write_parquet(tmp, statistics=False)


def plan_units(config: IngestSpec, seed: int) -> list[tuple]:
    work = []
    for index, spec in enumerate(config.sources):
        ctx = SourceContext(source_name(spec, index), seed, config.shard_size)
        work += [(spec, ctx, unit) for unit in SOURCES.get(spec.kind).plan(spec, ctx)]
    return work


def run(ctx: StageContext) -> StageResult:
    started = time.monotonic()
    work = plan_units(ctx.config, ctx.recipe.seed)
    units_dir = ctx.out / "units"
    todo = [w for w in work if not (units_dir / f"{unit_name(w[2])}.manifest.parquet").exists()]
    shard_prefix = ctx.store.relative(ctx.store.path(ctx.name, ctx.digest)) + "/shards"
    filters = list(ctx.config.filters)
    ctx.executor.map_units(
        process_unit, todo, desc="ingest", args=(filters, str(ctx.out), shard_prefix), progress=ctx.progress
    )
    names = [unit_name(w[2]) for w in work]
    manifest, quarantine = merge_units(
        [units_dir / f"{n}.manifest.parquet" for n in names],
        [units_dir / f"{n}.quarantine.parquet" for n in names],
        ctx.out / "manifest.parquet",
    )
    shards = [json.loads((units_dir / f"{n}.shard.json").read_text()) for n in names]
    shards_df = pl.DataFrame(shards, schema=SHARDS_SCHEMA, orient="row").filter(pl.col("samples") > 0)
    write_tables(ctx.out, None, quarantine, shards_df)  # the manifest is written by merge_units
    shutil.rmtree(units_dir, ignore_errors=True)
    report.write_quarantine_summary(quarantine, ctx.out / "quarantine_summary.json")
    first = manifest.head(16).collect()
    report.write_sample_grid(first, lambda rel: ctx.out / "shards" / Path(rel).name, ctx.out / "sample_grid.png")
    by_source = manifest.group_by("source").len().collect(engine="streaming")
    rows_out = int(by_source["len"].sum())
    seconds = max(time.monotonic() - started, 1e-9)
    reused = len(work) - len(todo)
    return StageResult(
        rows_in=rows_out + quarantine.height,
        rows_out=rows_out,
        rows_quarantined=quarantine.height,
        metrics={
            "units": len(work),
            "units_reused": reused,
            "shards": shards_df.height,
            "images_per_s": rows_out / seconds,
            **{f"rows_out.{k}": v for k, v in by_source.sort("source").iter_rows()},
        },
        artifacts=["quarantine.parquet", "quarantine_summary.json", "sample_grid.png", "shards.parquet"],
    )


def merge_units(manifests: list[Path], quarantines: list[Path], out: Path) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Stream the units' manifests, in unit order, to `out` (polars' streaming engine: never the whole
    table in memory). A key seen in two units (e.g. two input shards) keeps its first row; later ones
    go to the quarantine, after the units' own quarantine rows. Returns (the written manifest, lazily;
    the quarantine). Ingest and the incremental refresh (refresh.py) both merge this way."""
    if not manifests:
        pl.DataFrame(schema=MANIFEST_SCHEMA).write_parquet(out, statistics=False)
        return pl.scan_parquet(out), pl.DataFrame(schema=QUARANTINE_SCHEMA)
    rows = pl.scan_parquet(manifests).with_row_index("_row")
    quarantine = pl.concat([pl.read_parquet(q) for q in quarantines], how="vertical")
    repeated = rows.group_by("key").agg(pl.len()).filter(pl.col("len") > 1).select("key").collect(engine="streaming")
    later = (
        rows.join(repeated.lazy(), on="key", how="semi")
        .filter(pl.col("_row") != pl.col("_row").min().over("key"))
        .sort("_row")
        .select(
            "_row",
            "key",
            "source",
            pl.lit("duplicate-key").alias("reason"),
            pl.format("also in {}", pl.col("shard")).alias("detail"),
        )
        .collect()
    )
    kept = rows.join(later.lazy().select("_row"), on="_row", how="anti", maintain_order="left").drop("_row")
    kept.sink_parquet(out, statistics=False)
    quarantine = pl.concat([quarantine, later.drop("_row")], how="vertical").cast(QUARANTINE_SCHEMA)
    return pl.scan_parquet(out), quarantine


def rows_estimate(step: Any, plan: Any) -> tuple[int, int]:
    """Rows the sources list (before splits and filters), for `vlmflow plan`; also per source."""
    for _, source, unit in plan_units(step.config, plan.recipe.seed):
        plan.sources[source.name] = plan.sources.get(source.name, 0) + unit.rows
    total = sum(plan.sources.get(source_name(s, i), 0) for i, s in enumerate(step.config.sources))
    return total, total


COMPONENT = Component(
    name="ingest",
    config=IngestSpec,
    writes="samples",
    run=run,
    recipe_fields=("seed",),
    rows_estimate=rows_estimate,
    description="read every source's rows, check and filter them into WebDataset shards",
)
