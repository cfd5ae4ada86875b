"""CapFilt's pictures for MLflow: score histograms per origin (kept vs removed) and a grid
of kept and removed pairs with their captions and scores."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

from vlmflow.artifacts import atomic_path
from vlmflow.images import to_rgb
from vlmflow.samples import read_member

BINS, PLOT_W, PLOT_H, PAD = 20, 360, 160, 24
KEPT, REMOVED, INK = (40, 150, 70), (200, 60, 50), (0, 0, 0)


def histogram(values: list[float], low: float, high: float) -> list[int]:
    counts = [0] * BINS
    for v in values:
        counts[min(BINS - 1, max(0, int((v - low) / (high - low) * BINS)))] += 1
    return counts


def write_histograms(pairs: pl.DataFrame, origins: list[str], thresholds: dict[str, float], path: Path) -> None:
    """One panel per (score, origin): stacked bars of kept and removed pairs, threshold in force marked."""
    panels = []
    for score, low in (("itm", 0.0), ("itc", -1.0)):
        threshold = thresholds.get(score)
        for origin in origins:
            part = pairs.filter((pl.col("origin") == origin) & pl.col("judged"))
            if part.height:
                panels.append((score, origin, threshold, low, part))
    image = Image.new("RGB", (PLOT_W + 2 * PAD, max(1, len(panels)) * (PLOT_H + 2 * PAD)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for p, (score, origin, threshold, low, part) in enumerate(panels):
        top = p * (PLOT_H + 2 * PAD) + PAD
        kept = histogram(part.filter(pl.col("kept"))[score].to_list(), low, 1.0)
        removed = histogram(part.filter(~pl.col("kept"))[score].to_list(), low, 1.0)
        peak = max(1, *(k + r for k, r in zip(kept, removed, strict=True)))
        width = PLOT_W / BINS
        for b in range(BINS):
            x0 = PAD + b * width
            h_removed, h_kept = removed[b] / peak * PLOT_H, kept[b] / peak * PLOT_H
            bottom = top + PLOT_H
            draw.rectangle([x0, bottom - h_removed, x0 + width - 1, bottom], fill=REMOVED)
            draw.rectangle([x0, bottom - h_removed - h_kept, x0 + width - 1, bottom - h_removed], fill=KEPT)
        if threshold is not None:
            x = PAD + (threshold - low) / (1.0 - low) * PLOT_W
            draw.line([x, top, x, top + PLOT_H], fill=INK, width=2)
        title = f"{score} of {origin} captions: {int(part['kept'].sum())} kept (green), "
        draw.text((PAD, top - 16), title + f"{int((~part['kept']).sum())} removed (red); max bin {peak}", fill=INK)
        draw.text((PAD, top + PLOT_H + 2), f"{low:g}", fill=INK)
        draw.text((PAD + PLOT_W - 8, top + PLOT_H + 2), "1", fill=INK)
    if not panels:
        draw.text((PAD, PAD), "no pairs judged", fill=INK)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_examples(pairs: pl.DataFrame, index: pl.DataFrame, store_root: Path, path: Path, n: int = 8) -> None:
    """The first n images with a removed pair: the image, then each caption, kept or removed, with scores."""
    cell, lines_per, wrap = 180, 9, 30
    removed_keys = pairs.filter(~pl.col("kept"))["key"].unique(maintain_order=True).head(n).to_list()
    where = {r[0]: r[1:] for r in index.select("key", "shard", "image_offset", "image_size").iter_rows()}
    cols = 4
    height = cell + 12 * lines_per + 8
    grid = Image.new("RGB", (cols * cell, max(1, (len(removed_keys) + cols - 1) // cols) * height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, key in enumerate(removed_keys):
        x, y = (i % cols) * cell, (i // cols) * height
        shard, offset, size = where[key]
        with Image.open(io.BytesIO(read_member(store_root / shard, offset, size))) as opened:
            image = to_rgb(opened)
        image.thumbnail((cell - 8, cell - 8))
        grid.paste(image, (x + 4, y + 4))
        line = 0
        for pair in pairs.filter(pl.col("key") == key).iter_rows(named=True):
            score = f" {pair['itm']:.2f}" if pair["itm"] is not None else ""
            text = f"{'+' if pair['kept'] else '-'}{pair['origin'][0]}{score}: {pair['caption']}"
            for piece in textwrap.wrap(text, wrap)[:3]:
                if line < lines_per:
                    draw.text((x + 4, y + cell + 12 * line), piece, fill=KEPT if pair["kept"] else REMOVED)
                    line += 1
    if not removed_keys:
        draw.text((4, 4), "no pair removed", fill=INK)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
