"""`clip-score`: keep the image-caption pairs a CLIP-style model scores as matching, DataComp's
baseline filter (Gadre et al. 2023, "DataComp: In search of the next generation of multimodal
datasets": CLIP score filtering, the cosine similarity of a pair's image and text embeddings).

Each row of the judged splits that has a caption (the manifest's `caption`: its first) is scored
by the step's model (`components/curation.py`: a `model` input or a local CLIP folder) in batches
on the stage's executor. A row is kept when its score is >= the threshold: `threshold` as given,
or the `quantile` of the judged rows' scores (quantile 0.7 keeps about the top 30%, as DataComp's
"CLIP score top 30%"). A removed row is quarantined as `clip-score-below:THRESHOLD` (its score in
the detail). Rows of other splits, and rows without a caption (nothing to score), pass unchanged.

Output: the filtered samples artifact, `scores.parquet` (key, caption, score, kept per judged
row); metrics: the threshold, the share kept, the scores' mean, min, max and quantiles.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import Field, model_validator

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
from vlmflow.specs.base import Float
from vlmflow.stage import StageContext, StageResult

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class ClipScoreSpec(ModelStep):
    """DataComp's CLIP-score filter: give exactly one of threshold and quantile."""

    threshold: Float | None = Field(None, ge=-1, le=1, description="keep pairs whose cosine similarity is >= this")
    quantile: Float | None = Field(
        None, ge=0, lt=1, description="keep pairs scoring >= this quantile of the judged pairs' scores (0.7: top 30%)"
    )

    @model_validator(mode="after")
    def _one_rule(self) -> ClipScoreSpec:
        if (self.threshold is None) == (self.quantile is None):
            raise ValueError("give exactly one of threshold and quantile")
        return self


def cutoff(scores: np.ndarray, threshold: float | None, quantile: float | None) -> float:
    """The score a pair must reach: the threshold, or the quantile of the scores (an observed score,
    the highest that at least 1 - quantile of them reach)."""
    if threshold is not None:
        return float(threshold)
    if not len(scores):
        return 1.0
    return float(np.quantile(scores, quantile, method="inverted_cdf"))


def summary(scores: np.ndarray, kept: np.ndarray, limit: float) -> dict[str, float]:
    """Metrics of a run: the threshold in force, what was judged and kept, the scores' distribution."""
    out = {"threshold": limit, "judged": float(len(scores)), "kept": float(kept.sum())}
    out["kept_share"] = float(kept.mean()) if len(scores) else 1.0
    if len(scores):
        out |= {"score_mean": float(scores.mean()), "score_min": float(scores.min()), "score_max": float(scores.max())}
        out |= {f"score_p{round(q * 100):02d}": float(np.quantile(scores, q)) for q in QUANTILES}
    return out


def run(ctx: StageContext) -> StageResult:
    spec: ClipScoreSpec = ctx.config
    data = ctx.inputs["data"].path
    manifest = pl.read_parquet(data / "manifest.parquet")
    captions = manifest.select("key", "caption").filter(pl.col("caption").str.strip_chars() != "")
    rows = judged(build_index(data, ctx.store.root), spec.splits).join(captions, on="key", how="inner")
    scores = embed(ctx, rows, rows["caption"].to_list(), f"{ctx.name} score").astype(np.float64)
    limit = cutoff(scores, spec.threshold, spec.quantile)
    kept = scores >= limit
    table = rows.select("key", "caption").with_columns(score=pl.Series(scores), kept=pl.Series(kept, dtype=pl.Boolean))
    table.write_parquet(ctx.out / "scores.parquet")
    removed = table.filter(~pl.col("kept")).select(
        "key",
        pl.lit(f"clip-score-below:{limit:.4f}").alias("reason"),
        pl.format("score {}", pl.col("score").round(4)).alias("detail"),
    )
    quarantine = write_filtered(ctx, manifest, removed.cast(REMOVED_SCHEMA))
    metrics = summary(scores, kept, limit) | {"passed_unscored": float(manifest.height - rows.height)}
    return StageResult(
        rows_in=manifest.height,
        rows_out=manifest.height - quarantine.height,
        rows_quarantined=quarantine.height,
        metrics=metrics,
        artifacts=["scores.parquet", "quarantine.parquet", "quarantine_summary.json"],
        details={"model": str(model_folder(ctx))},
    )


COMPONENT = Component(
    name="clip-score",
    config=ClipScoreSpec,
    reads=model_ports,
    writes="samples",
    run=run,
    description="keep the image-caption pairs whose CLIP score (a CLIP-style model's cosine) passes a threshold "
    "or quantile (quarantined as clip-score-below:THRESHOLD)",
)
