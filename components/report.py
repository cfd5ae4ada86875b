"""Small reports a stage logs to MLflow: quarantine summary and a sample grid image."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

from vlmflow.artifacts import atomic_path
from vlmflow.images import to_rgb
from vlmflow.samples import read_shard


def write_quarantine_summary(quarantine: pl.DataFrame, path: Path) -> dict:
    """Counts by reason (reasons like duplicate-of:KEY grouped by their prefix) and by source."""
    reasons = quarantine["reason"].str.split(":").list.first() if quarantine.height else pl.Series([], dtype=pl.String)
    by_reason = dict(sorted(reasons.value_counts().iter_rows())) if quarantine.height else {}
    by_source = dict(sorted(quarantine["source"].value_counts().iter_rows())) if quarantine.height else {}
    summary = {"total": quarantine.height, "by_reason": by_reason, "by_source": by_source}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def write_sample_grid(
    manifest: pl.DataFrame, shard_path: Callable[[str], Path], path: Path, n: int = 16, cell: int = 96
) -> None:
    """A 4-column grid of the first n samples of the manifest, read back from their shards
    (`shard_path` maps a manifest's shard column to a file)."""
    wanted = manifest.head(n)
    keys = set(wanted["key"].to_list())
    images: dict[str, Image.Image] = {}
    for shard in wanted["shard"].unique(maintain_order=True).to_list():
        for sample in read_shard(shard_path(shard)):
            if sample["__key__"] in keys:
                ext = next(k for k in sample if k not in ("__key__", "json"))
                images[sample["__key__"]] = to_rgb(Image.open(io.BytesIO(sample[ext])))
    ordered = [images[k] for k in wanted["key"].to_list() if k in images]
    cols = 4
    rows = max(1, (len(ordered) + cols - 1) // cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, image in enumerate(ordered):
        image.thumbnail((cell - 4, cell - 4))
        grid.paste(image, ((i % cols) * cell + 2, (i // cols) * cell + 2))
    if not ordered:
        ImageDraw.Draw(grid).text((4, 4), "no samples", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
