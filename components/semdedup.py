"""`semdedup`: remove semantic duplicates, SemDeDup (Abbas et al. 2023, "SemDeDup: Data-efficient
learning at web-scale through semantic deduplication", arXiv:2303.09540).

1. Embed every image of the judged splits with the step's model (`components/curation.py`: a
   `model` input or a local CLIP folder), in batches on the stage's executor; unit vectors.
2. Cluster the embeddings with spherical k-means (cosine; written here with numpy: no clustering
   library is a dependency of the project, and the few lines below need none). Initial centroids
   are `clusters` distinct rows drawn with the recipe's seed (as faiss's k-means draws them);
   Lloyd iterations until no assignment changes or `iterations` are done; an emptied cluster keeps
   its centroid.
3. Within each cluster, the paper's rule as its reference code applies it (facebookresearch/SemDeDup,
   `sort_clusters.py` with keep_hard and `semdedup.py`): order the cluster's rows by cosine
   similarity to the centroid, farthest first (ties by key); a row is removed when its cosine
   similarity with any row earlier in that order is > `threshold` (the paper's 1 - eps). So of a
   group of duplicates the row farthest from the centroid is kept. The removal is not transitive:
   a row can go because it is close to a row that itself went, as in the reference code.

A removed row is quarantined as `semantic-duplicate:KEPT`, KEPT the kept row it leads to (its
most similar earlier row, or that row's, until a kept one); the detail gives the cosine to its most
similar earlier row. Rows of other splits pass unchanged.

Output: the filtered samples artifact, `semantic_pairs.parquet` (key, kept, nearest, cosine,
cluster: every removed row, most similar first: the examples to look at) and `clusters.parquet`
(key, cluster, centroid_cosine); metrics: the share removed, clusters, largest cluster.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import Field

from vlmflow.component import Component
from vlmflow.components.curation import (
    REMOVED_SCHEMA,
    ModelStep,
    embed,
    judged,
    model_folder,
    model_ports,
    write_filtered,
)
from vlmflow.samples import build_index
from vlmflow.specs.base import Float, Int
from vlmflow.stage import StageContext, StageResult

BLOCK = 1024  # rows of a cluster compared at once: a [n, BLOCK] similarity block
ASSIGN_ROWS = 1 << 16  # rows assigned to centroids at once in k-means
UNITS = 32  # at most this many map units (groups of clusters) on the executor
EXAMPLES = 8  # pairs named in the stage's details
PAIRS_SCHEMA = {"key": pl.String, "kept": pl.String, "nearest": pl.String, "cosine": pl.Float64, "cluster": pl.Int64}


class SemDedupSpec(ModelStep):
    """SemDeDup: k-means on the model's image embeddings, duplicates removed within each cluster."""

    clusters: Int = Field(100, ge=1, description="k-means clusters (at most one per judged row)")
    threshold: Float = Field(
        0.95, gt=0, le=1, description="two rows are duplicates when their cosine similarity is > this (1 - eps)"
    )
    iterations: Int = Field(50, ge=1, le=1000, description="most k-means iterations")


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's most similar centroid (rows in blocks of ASSIGN_ROWS)."""
    return np.concatenate(
        [np.argmax(x[i : i + ASSIGN_ROWS] @ centroids.T, axis=1) for i in range(0, len(x), ASSIGN_ROWS)]
    ) if len(x) else np.empty(0, np.int64)  # fmt: skip


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of unit rows: (unit centroids [min(k, N), E], each row's cluster [N])."""
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(len(x), size=min(k, len(x)), replace=False))].astype(np.float64)
    assignment = nearest(x, centroids)
    for _ in range(iterations):
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.where(norms > 0, sums / np.where(norms > 0, norms, 1), centroids)
        moved = nearest(x, centroids)
        if np.array_equal(moved, assignment):
            break
        assignment = moved
    return centroids, assignment


def cluster_duplicates(
    keys: list[str], x: np.ndarray, centroid: np.ndarray, threshold: float
) -> list[tuple[str, str, str, float]]:
    """(removed key, kept key, most similar earlier key, cosine) for every row of one cluster the rule
    removes (module docstring, step 3)."""
    names = np.array(keys, dtype=object)
    order = np.lexsort((names, x @ centroid))  # ascending similarity to the centroid: farthest first
    y, names = x[order], names[order]
    n = len(y)
    best, earlier = np.full(n, -np.inf), np.zeros(n, np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        sims = y[:stop] @ y[start:stop].T
        sims[np.arange(stop)[:, None] >= np.arange(start, stop)[None, :]] = -np.inf  # only earlier rows
        best[start:stop], earlier[start:stop] = sims.max(axis=0), sims.argmax(axis=0)
    removed = best > threshold
    kept = np.arange(n)
    for j in np.flatnonzero(removed):  # ascending: an earlier row's kept row is known
        kept[j] = kept[earlier[j]]
    return [(names[j], names[kept[j]], names[earlier[j]], float(best[j])) for j in np.flatnonzero(removed)]


def dedup_clusters(unit: list[tuple[int, list[str], np.ndarray, np.ndarray]], threshold: float) -> list[tuple]:
    """cluster_duplicates of each (cluster, keys, embeddings, centroid) of a unit, with the cluster."""
    return [(*found, cluster) for cluster, keys, x, c in unit for found in cluster_duplicates(keys, x, c, threshold)]


def run(ctx: StageContext) -> StageResult:
    spec: SemDedupSpec = ctx.config
    data = ctx.inputs["data"].path
    manifest = pl.read_parquet(data / "manifest.parquet")
    rows = judged(build_index(data, ctx.store.root), spec.splits)
    keys = rows["key"].to_list()
    x = embed(ctx, rows, None, f"{ctx.name} embed").astype(np.float64)
    centroids, assignment = (kmeans(x, spec.clusters, ctx.recipe.seed, spec.iterations) if len(keys)
                             else (np.empty((0, 0)), np.empty(0, np.int64)))  # fmt: skip
    members = [np.flatnonzero(assignment == c) for c in range(len(centroids))]
    units: list[list] = [[] for _ in range(min(UNITS, len(centroids)))]
    for c, m in enumerate(members):
        units[c % len(units)].append((c, [keys[i] for i in m], x[m], centroids[c]))
    found = ctx.executor.map_units(
        dedup_clusters, units, desc=f"{ctx.name} clusters", args=(spec.threshold,), progress=ctx.progress
    )
    pairs = pl.DataFrame([p for part in found for p in part], schema=PAIRS_SCHEMA, orient="row")
    pairs = pairs.sort(["cosine", "key"], descending=[True, False])
    pairs.write_parquet(ctx.out / "semantic_pairs.parquet")
    cosines = (x * centroids[assignment]).sum(axis=1) if len(keys) else np.empty(0)
    pl.DataFrame({"key": keys, "cluster": assignment, "centroid_cosine": cosines}).write_parquet(
        ctx.out / "clusters.parquet"
    )
    removed = pairs.select(
        "key",
        pl.format("semantic-duplicate:{}", "kept").alias("reason"),
        pl.format("cosine {} to {}", pl.col("cosine").round(4), "nearest").alias("detail"),
    )
    quarantine = write_filtered(ctx, manifest, removed.cast(REMOVED_SCHEMA))
    sizes = [len(m) for m in members]
    return StageResult(
        rows_in=manifest.height,
        rows_out=manifest.height - quarantine.height,
        rows_quarantined=quarantine.height,
        metrics={
            "judged": float(len(keys)),
            "removed": float(pairs.height),
            "removed_share": pairs.height / len(keys) if keys else 0.0,
            "clusters": float(len(centroids)),
            "largest_cluster": float(max(sizes, default=0)),
        },
        artifacts=["semantic_pairs.parquet", "clusters.parquet", "quarantine.parquet", "quarantine_summary.json"],
        details={"model": str(model_folder(ctx)), "examples": pairs.head(EXAMPLES).rows()},
    )


COMPONENT = Component(
    name="semdedup",
    config=SemDedupSpec,
    reads=model_ports,
    writes="samples",
    run=run,
    recipe_fields=("seed",),
    description="SemDeDup: k-means on a model's image embeddings, then within each cluster remove the rows whose "
    "cosine similarity to a row farther from the centroid is above a threshold (semantic-duplicate:KEPT)",
)
