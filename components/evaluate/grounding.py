"""Score referring-expression grounding (MiniGPT-v2's `[refer]` task): the box a model writes in its
answer (`{<x1><y1><x2><y2>}`, `vlmflow.grounding`) against the object's true box.

Metrics: `grounding_accuracy`, the share of items whose predicted box overlaps the truth with IoU
>= 0.5 (RefCOCO's accuracy), `mean_iou`, and `parse_failure_rate` (answers without a box, scored
IoU 0). Each has a baseline a model blind to the image can reach, the better of two constant boxes:
the mean box of the items asking about the same object name (where that object tends to be and how
large, fitted on the items scored, as VQA's majority answer per question) and the whole image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from vlmflow.components.evaluate.datasets import Item
from vlmflow.grounding import Box, iou, parse_box

Scored = tuple[dict[str, float], list[dict]]
THRESHOLD = 0.5
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)


def truth_of(item: Item) -> Box:
    box = parse_box(item.references[0])
    if box is None:
        raise ValueError(f"grounding item {item.id}: reference {item.references[0]!r} is not a box")
    return box


def mean_boxes(items: Sequence[Item], truths: Sequence[Box]) -> dict[str, Box]:
    """Per question (the object's name), the mean of its items' true boxes."""
    by_question: dict[str, list[Box]] = defaultdict(list)
    for item, box in zip(items, truths, strict=True):
        by_question[item.question].append(box)
    return {q: tuple(float(v) for v in np.mean(boxes, axis=0)) for q, boxes in by_question.items()}


def overlaps(guesses: Sequence[Box], truths: Sequence[Box]) -> np.ndarray:
    return np.array([iou(g, t) for g, t in zip(guesses, truths, strict=True)])


def score(items: Sequence[Item], predictions: Sequence[str]) -> Scored:
    truths = [truth_of(item) for item in items]
    parsed = [parse_box(text) for text in predictions]
    ious = np.array([0.0 if p is None else iou(p, t) for p, t in zip(parsed, truths, strict=True)])
    means = mean_boxes(items, truths)
    blind = [overlaps([means[item.question] for item in items], truths), overlaps([WHOLE_IMAGE] * len(items), truths)]
    metrics = {
        "grounding_accuracy": float(np.mean(ious >= THRESHOLD)),
        "grounding_accuracy_baseline": max(float(np.mean(b >= THRESHOLD)) for b in blind),
        "mean_iou": float(np.mean(ious)),
        "mean_iou_baseline": max(float(np.mean(b)) for b in blind),
        "parse_failure_rate": float(np.mean([p is None for p in parsed])),
        "items": float(len(items)),
    }
    rows = [
        {"id": item.id, "question": item.question, "prediction": text, "answer": item.references[0],
         "iou": float(value), "correct": bool(value >= THRESHOLD)}
        for item, text, value in zip(items, predictions, ious, strict=True)
    ]  # fmt: skip
    return metrics, rows
