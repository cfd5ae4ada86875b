"""Image-text matching (ITM) evaluation: every image is scored with its own caption and with a
caption of another image, so matched and mismatched pairs are balanced and a head blind to the
image scores 0.5 accuracy and 0.5 AUC.

The mismatched caption is drawn from the seed among the other images' captions, never a text
equal to one of the image's own (synthetic captions repeat across images: an identical caption
is a true match). An image for which every other caption is one of its own has no negative and
is quarantined as `no-mismatched-caption`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vlmflow.components.evaluate.datasets import Item

Scored = tuple[dict[str, float], list[dict]]
TRIES = 64  # random draws before an exhaustive search for a caption that differs


def with_mismatched(items: Sequence[Item], seed: int) -> tuple[list[Item], list[Item]]:
    """(items with `mismatched` set, items that have no other caption), the same for the same seed."""
    kept, lacking = [], []
    for i, item in enumerate(items):
        rng = np.random.default_rng([seed, zlib.crc32(item.id.encode())])
        text = _draw(items, i, rng)
        if text is None:
            lacking.append(item)
        else:
            kept.append(replace(item, mismatched=text))
    return kept, lacking


def _draw(items: Sequence[Item], i: int, rng: np.random.Generator) -> str | None:
    own = set(items[i].references)
    for _ in range(TRIES if len(items) > 1 else 0):
        j = int(rng.integers(len(items) - 1))
        other = items[j + (j >= i)]
        text = other.references[int(rng.integers(len(other.references)))]
        if text not in own:
            return text
    rest = [t for j, other in enumerate(items) if j != i for t in other.references if t not in own]
    return rest[int(rng.integers(len(rest)))] if rest else None


def pairs(items: Sequence[Item]) -> list[tuple[Item, str, bool]]:
    """(item, caption, is a match): each item's first caption, then its mismatched one."""
    return [pair for item in items for pair in ((item, item.references[0], True), (item, item.mismatched, False))]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a matched pair scores above a mismatched one), ties count half."""
    positive, negative = scores[labels], scores[~labels]
    above = (positive[:, None] > negative[None, :]).mean()
    tied = (positive[:, None] == negative[None, :]).mean()
    return float(above + tied / 2)


def score(items: Sequence[Item], probabilities: Sequence[float]) -> Scored:
    """Metrics, and one row per item (both of its pairs), from the head's P(match) of each pair of
    `pairs(items)`."""
    listed = pairs(items)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (len(listed),):
        raise ValueError(f"{p.shape[0]} match probabilities for {len(listed)} pairs")
    labels = np.array([match for _, _, match in listed])
    correct = (p > 0.5) == labels
    metrics = {
        "itm_accuracy": float(correct.mean()),
        "itm_accuracy_chance": 0.5,
        "itm_auc": auc(p, labels),
        "itm_auc_chance": 0.5,
        "matched_accuracy": float(correct[labels].mean()),
        "mismatched_accuracy": float(correct[~labels].mean()),
        "items": float(len(items)),
    }
    rows = [
        {"id": item.id, "caption": item.references[0], "mismatched": item.mismatched,
         "p_match": float(p[2 * i]), "p_match_mismatched": float(p[2 * i + 1]),
         "prediction": f"P(match) own {p[2 * i]:.2f}, other {p[2 * i + 1]:.2f}",
         "correct": bool(correct[2 * i] and correct[2 * i + 1])}
        for i, item in enumerate(items)
    ]  # fmt: skip
    return metrics, rows
