"""A rendered examples image for a task: each item's image with its question, the model's
prediction and the reference, so a reader of the MLflow run sees what the numbers mean."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from vlmflow.artifacts import atomic_path
from vlmflow.components.evaluate.datasets import Item
from vlmflow.images import to_rgb

CELL, TEXT_LINES, WRAP = 160, 7, 26


def caption_lines(item: Item, row: dict) -> list[str]:
    parts = []
    if item.question:
        parts.append(f"Q: {item.question}")
    if item.options:
        parts.append(" ".join(f"{k}) {v}" for k, v in item.options))
    parts.append(f"pred: {row.get('prediction', '')}")
    truth = row.get("label") or row.get("answer") or " | ".join(item.references[:2])
    parts.append(f"ref: {truth}")
    lines = [line for part in parts for line in textwrap.wrap(str(part), WRAP) or [""]]
    return lines[:TEXT_LINES]


def write_examples(items: Sequence[Item], rows: Sequence[dict], path: Path, n: int = 8) -> None:
    """A 4-column grid of the first n items: image on top, text below."""
    chosen = list(zip(items, rows, strict=True))[:n]
    cols = 4
    height = CELL + 12 * TEXT_LINES + 6
    grid = Image.new("RGB", (cols * CELL, max(1, (len(chosen) + cols - 1) // cols) * height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (item, row) in enumerate(chosen):
        x, y = (i % cols) * CELL, (i // cols) * height
        with Image.open(io.BytesIO(item.image)) as opened:
            image = to_rgb(opened)
        scale = (CELL - 8) / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        grid.paste(image, (x + 4, y + 4))
        colour = (0, 120, 0) if row.get("correct") or row.get("exact_match") else (0, 0, 0)
        for j, line in enumerate(caption_lines(item, row)):
            draw.text((x + 4, y + CELL + 12 * j), line, fill=colour)
    if not chosen:
        draw.text((4, 4), "no items", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
