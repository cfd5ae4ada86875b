"""Row filters: each returns None to keep a row, or (reason, detail) to quarantine it."""

from __future__ import annotations

from collections.abc import Callable

from vlmflow.components.sources.base import RawRow
from vlmflow.images import CheckedImage
from vlmflow.registry import Registry
from vlmflow.specs.data import AspectRatioFilter, CaptionLengthFilter, MinSizeFilter

Verdict = tuple[str, str] | None
FilterFn = Callable[[object, RawRow, CheckedImage], Verdict]
FILTERS: Registry[FilterFn] = Registry("filter")


def row_texts(row: RawRow) -> list[str]:
    """The texts a row is paired with: its captions, else its conversation turns."""
    if row.captions:
        return row.captions
    return [str(turn.get("content", "")) for turn in row.extra.get("conversations", [])]


@FILTERS.decorator("min-size")
def min_size(spec: MinSizeFilter, row: RawRow, image: CheckedImage) -> Verdict:
    if image.width < spec.width or image.height < spec.height:
        return "image-too-small", f"{image.width}x{image.height} < {spec.width}x{spec.height}"
    return None


@FILTERS.decorator("caption-length")
def caption_length(spec: CaptionLengthFilter, row: RawRow, image: CheckedImage) -> Verdict:
    texts = row_texts(row)
    if not texts:
        return "missing-caption", "the row has no caption or conversation"
    if all(not t.strip() for t in texts):
        return "empty-caption", "every caption is blank"
    shortest, longest = min(len(t) for t in texts), max(len(t) for t in texts)
    if shortest < spec.min_chars:
        return "caption-too-short", f"{shortest} chars < {spec.min_chars}"
    if longest > spec.max_chars:
        return "caption-too-long", f"{longest} chars > {spec.max_chars}"
    return None


@FILTERS.decorator("aspect-ratio")
def aspect_ratio(spec: AspectRatioFilter, row: RawRow, image: CheckedImage) -> Verdict:
    ratio = max(image.width, image.height) / max(1, min(image.width, image.height))
    if ratio > spec.max_ratio:
        return "extreme-aspect-ratio", f"{ratio:.2f} > {spec.max_ratio}"
    return None


def first_failure(filters: list, row: RawRow, image: CheckedImage) -> Verdict:
    for spec in filters:
        verdict = FILTERS.get(spec.kind)(spec, row, image)
        if verdict is not None:
            return verdict
    return None
