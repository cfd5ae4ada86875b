"""Referring-expression grounding as MiniGPT-v2 writes it: the task token `[refer]`, the object named
in the question, and its box in the answer as `{<x1><y1><x2><y2>}`, corners on a 0-100 grid of the
image. Training (the `refer` format) and evaluation (the `grounding` task) share these texts, so
a model is asked as it was taught.

A sample's referring items come from its `objects` (each with a normalised `bbox` [x, y, w, h]):
an object is named by its color and shape (synthetic shapes) or its category (COCO instances), and
only an object whose name is unique in its image is asked about (the question has one answer).
"""

from __future__ import annotations

import re
from collections import Counter

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in [0, 1]

REFER_PROMPT = "[refer] give me the location of the {}"
GRID = 100
_BOX = re.compile(r"\{\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*\}")


def box_text(box: Box) -> str:
    """`{<x1><y1><x2><y2>}` with each corner rounded onto the 0-100 grid."""
    return "{" + "".join(f"<{round(min(max(v, 0.0), 1.0) * GRID)}>" for v in box) + "}"


def parse_box(text: str) -> Box | None:
    """The first `{<x1><y1><x2><y2>}` of a text as corners in [0, 1], or None when there is none or
    it is not a box (a corner past 100, or x2 < x1 or y2 < y1)."""
    match = _BOX.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (int(v) / GRID for v in match.groups())
    if max(x1, y1, x2, y2) > 1 or x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two corner boxes (0 when both are empty)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def object_name(obj: dict) -> str | None:
    """`color shape` of a synthetic object, the category of a COCO one, else None."""
    if isinstance(obj.get("color"), str) and isinstance(obj.get("shape"), str):
        return f"{obj['color']} {obj['shape']}"
    category = obj.get("category")
    return category if isinstance(category, str) and category else None


def corners(obj: dict) -> Box | None:
    """The object's normalised [x, y, w, h] bbox as corners, or None when it has no usable one."""
    bbox = obj.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return None if w <= 0 or h <= 0 else (x, y, x + w, y + h)


def refer_items(record: dict) -> list[tuple[str, str, Box]]:
    """(question, answer, box) for every object of the sample whose name no other object shares."""
    objects = [o for o in record.get("objects") or [] if isinstance(o, dict)]
    named = [(object_name(o), corners(o)) for o in objects]
    counts = Counter(name for name, _ in named)
    return [
        (REFER_PROMPT.format(name), box_text(box), box)
        for name, box in named
        if name is not None and box is not None and counts[name] == 1
    ]
