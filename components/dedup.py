"""Dedup: exact duplicates (same decoded pixels) and near duplicates (perceptual hash).

The work is a join over the manifest, so it runs on dask dataframes (on Ray through
`ray.util.dask` when Ray is up, else dask's threads), partitioned, never all in memory:
- exact: group by pixel_sha256; every row whose key is not the group's smallest key is a
  duplicate of it;
- near: a 64-bit pHash split into threshold+1 bands (pigeonhole: two hashes within the
  Hamming threshold agree exactly on at least one band); a self-join on (band, value)
  gives candidate pairs, kept when their full Hamming distance is within the threshold.
  Pairs are merged into clusters (union-find); each cluster keeps its smallest key.
Duplicates go to the quarantine as `duplicate-of:KEY`; shards are not copied: the output
manifest references the input's shards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from vlmflow.component import Component, Port
from vlmflow.components import report
from vlmflow.components.ingest import QUARANTINE_SCHEMA
from vlmflow.specs.data import DedupSpec
from vlmflow.stage import StageContext, StageResult

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd

# dask, pandas and Ray are imported by the functions that use them: declaring the component (and
# validating or planning a recipe) imports none of them.


def _scheduler() -> object:
    import ray

    if ray.is_initialized():
        from ray.util.dask import ray_dask_get

        return ray_dask_get
    return "threads"


def exact_duplicates(frame: dd.DataFrame) -> pd.DataFrame:
    """(key, canonical) for every row whose pixels equal a row with a smaller key."""
    canonical = frame.groupby("pixel_sha256")["key"].min().rename("canonical").reset_index()
    joined = frame[["key", "pixel_sha256"]].merge(canonical, on="pixel_sha256")
    dups = joined[joined["key"] != joined["canonical"]][["key", "canonical"]]
    return dups.compute(scheduler=_scheduler())


def band_masks(threshold: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, mask) of threshold+1 bands covering all bits."""
    bands = threshold + 1
    width = bits // bands
    out = []
    for b in range(bands):
        shift = b * width
        size = width if b < bands - 1 else bits - shift
        out.append((shift, (1 << size) - 1))
    return out


def _bands(part: pd.DataFrame, masks: list[tuple[int, int]]) -> pd.DataFrame:
    import pandas as pd

    hashes = part["phash"].to_numpy(dtype=np.uint64)
    frames = [
        pd.DataFrame(
            {
                "key": part["key"].to_numpy(),
                "band": np.full(len(part), b, dtype=np.int16),
                "value": (hashes >> np.uint64(shift)) & np.uint64(mask),
            }
        )
        for b, (shift, mask) in enumerate(masks)
    ]
    return pd.concat(frames, ignore_index=True)


def _verify(part: pd.DataFrame, threshold: int, max_color: float) -> pd.DataFrame:
    """Keep candidate pairs within the Hamming threshold and the colour difference."""
    import pandas as pd

    xor = part["phash_a"].to_numpy(np.uint64) ^ part["phash_b"].to_numpy(np.uint64)
    distance = np.bitwise_count(xor).astype(np.int16)
    thumbs_a = np.stack([np.frombuffer(t, np.uint8) for t in part["thumb_a"]]) if len(part) else np.empty((0, 1))
    thumbs_b = np.stack([np.frombuffer(t, np.uint8) for t in part["thumb_b"]]) if len(part) else np.empty((0, 1))
    color = np.abs(thumbs_a.astype(np.int16) - thumbs_b.astype(np.int16)).mean(axis=1) if len(part) else np.empty(0)
    out = pd.DataFrame(
        {
            "key_a": part["key_a"].to_numpy(),
            "key_b": part["key_b"].to_numpy(),
            "distance": distance,
            "color": color.astype(np.float64),
        }
    )
    return out[(out["distance"] <= threshold) & (out["color"] <= max_color)]


def near_pairs(frame: dd.DataFrame, threshold: int, max_color: float) -> pd.DataFrame:
    """(key_a, key_b, distance, color) with key_a < key_b, Hamming(phash) <= threshold and
    mean |RGB| difference of the thumbnails <= max_color."""
    import pandas as pd

    masks = band_masks(threshold)
    meta = pd.DataFrame(
        {"key": pd.Series(dtype=str), "band": pd.Series(dtype=np.int16), "value": pd.Series(dtype=np.uint64)}
    )
    banded = frame[["key", "phash"]].map_partitions(_bands, masks, meta=meta)
    candidates = banded.merge(banded, on=["band", "value"], suffixes=("_a", "_b"))
    candidates = candidates[candidates["key_a"] < candidates["key_b"]][["key_a", "key_b"]].drop_duplicates()
    values = frame[["key", "phash", "thumb"]]
    candidates = candidates.merge(
        values.rename(columns={"key": "key_a", "phash": "phash_a", "thumb": "thumb_a"}), on="key_a"
    )
    candidates = candidates.merge(
        values.rename(columns={"key": "key_b", "phash": "phash_b", "thumb": "thumb_b"}), on="key_b"
    )
    meta_out = pd.DataFrame(
        {
            "key_a": pd.Series(dtype=str),
            "key_b": pd.Series(dtype=str),
            "distance": pd.Series(dtype=np.int16),
            "color": pd.Series(dtype=np.float64),
        }
    )
    found = candidates.map_partitions(_verify, threshold, max_color, meta=meta_out).compute(scheduler=_scheduler())
    return found.sort_values(["key_a", "key_b"]).reset_index(drop=True)


def clusters(pairs: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """Union-find over pairs: key -> (smallest key of its cluster, distance of the pair that joined it)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    joined_by: dict[str, int] = {}
    for a, b, distance, _color in pairs.itertuples(index=False):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        joined_by.setdefault(b, int(distance))
    return {k: (find(k), joined_by.get(k, 0)) for k in list(parent) if find(k) != k}


def find_duplicates(manifest: Path, spec: DedupSpec) -> pl.DataFrame:
    """Quarantine rows (key, reason, detail) for every duplicate in the manifest."""
    import dask

    with dask.config.set({"dataframe.convert-string": False}):  # one string dtype on both sides of the joins
        return _find_duplicates(manifest, spec)


def _find_duplicates(manifest: Path, spec: DedupSpec) -> pl.DataFrame:
    import dask.dataframe as dd
    import pandas as pd

    frame = dd.read_parquet(str(manifest), columns=["key", "pixel_sha256", "phash", "thumb"])
    frame = frame.repartition(npartitions=spec.partitions)
    rows: list[dict] = []
    exact = exact_duplicates(frame) if spec.exact else pd.DataFrame(columns=["key", "canonical"])
    for key, canonical in exact.sort_values("key").itertuples(index=False):
        rows.append({"key": key, "reason": f"duplicate-of:{canonical}", "detail": "exact: identical pixels"})
    if spec.near:
        survivors = frame[~frame["key"].isin(set(exact["key"]))]
        for key, (canonical, distance) in sorted(
            clusters(near_pairs(survivors, spec.hamming_threshold, spec.max_color_difference)).items()
        ):
            rows.append(
                {"key": key, "reason": f"duplicate-of:{canonical}", "detail": f"near: phash distance {distance}"}
            )
    return pl.DataFrame(rows, schema={"key": pl.String, "reason": pl.String, "detail": pl.String}, orient="row")


def run(ctx: StageContext) -> StageResult:
    started = time.monotonic()
    source = ctx.inputs["data"]
    manifest = pl.read_parquet(source.path / "manifest.parquet")
    dups = find_duplicates(source.path / "manifest.parquet", ctx.config)
    quarantine = dups.join(manifest.select("key", "source"), on="key", how="left").select(list(QUARANTINE_SCHEMA))
    kept = manifest.filter(~pl.col("key").is_in(dups["key"].implode()))
    kept.write_parquet(ctx.out / "manifest.parquet", statistics=False)
    quarantine.write_parquet(ctx.out / "quarantine.parquet", statistics=False)
    shards = pl.read_parquet(source.path / "shards.parquet")
    shards.filter(pl.col("shard").is_in(kept["shard"].unique().implode())).write_parquet(ctx.out / "shards.parquet")
    report.write_quarantine_summary(quarantine, ctx.out / "quarantine_summary.json")
    seconds = max(time.monotonic() - started, 1e-9)
    near = quarantine.filter(pl.col("detail").str.starts_with("near")).height
    return StageResult(
        rows_in=manifest.height,
        rows_out=kept.height,
        rows_quarantined=quarantine.height,
        metrics={
            "exact_duplicates": quarantine.height - near,
            "near_duplicates": near,
            "rows_per_s": manifest.height / seconds,
        },
        artifacts=["quarantine.parquet", "quarantine_summary.json"],
    )


COMPONENT = Component(
    name="dedup",
    config=DedupSpec,
    reads={"data": Port("samples")},
    writes="samples",
    run=run,
    description="drop exact and near duplicate images (quarantined as duplicate-of:KEY)",
)
