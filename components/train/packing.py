"""Sequence packing: the samples of a micro-batch laid side by side in as few rows as fit.

A padded micro-batch spends compute on padding up to its longest sample; packed, its samples
share rows of up to `capacity` tokens (first-fit decreasing, deterministic: ties go by
position) and only the last row's tail and the rows' ends are padding. Segment ids (1, 2, …
per row, 0 for padding) tell the model where each sample starts, so that it attends only to
itself, counts positions from 0 and has its own loss (`vlmflow.models.packed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmflow.models.objectives import IGNORE


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Which samples (indices into `lengths`) share each row: longest first, each into the first row
    with room for it. A sample longer than `capacity` is never split or dropped: it gets a row of its
    own, as long as it is."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
        if fits is None:
            rows.append([i])
            room.append(max(capacity - lengths[i], 0))
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows


def pack_batch(batch: dict[str, torch.Tensor], capacity: int, image_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded LM batch (pixels, input_ids, attention_mask, labels; one sample per row, its image
    in the same row of pixels) as packed rows with `segment_ids`; pixels follow the order of the
    `<image>` runs in the packed rows. The attention mask still marks real tokens (1) and padding (0)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    images = []
    for r, row in enumerate(rows):
        at = 0
        for segment, i in enumerate(row, start=1):
            n = lengths[i]
            ids[r, at : at + n] = batch["input_ids"][i, :n]
            labels[r, at : at + n] = batch["labels"][i, :n]
            mask[r, at : at + n] = 1
            segments[r, at : at + n] = segment
            if bool((batch["input_ids"][i, :n] == image_id).any()):
                images.append(batch["pixels"][i])
            at += n
    pixels = torch.stack(images) if images else batch["pixels"][:0]
    return {"pixels": pixels, "input_ids": ids, "attention_mask": mask, "labels": labels, "segment_ids": segments}
