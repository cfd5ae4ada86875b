"""Few-shot evaluation (Flamingo): in-context examples before each question.

Each item gets `shots` examples (image, question, answer) drawn from the train split of the
held-out data's artifact, as OpenFlamingo draws them from the training set: distinct samples,
one of each sample's QA pairs, from a generator seeded by (seed, item number), so a rerun asks
the same prompts. The model sees `<bos>`, the examples as interleaved samples, then the query.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import torch

from vlmflow.components.evaluate.datasets import Item
from vlmflow.components.train.data import ImageSpec, ShardSamples, preprocess, split_rows
from vlmflow.components.train.interleaved import InterleavedCodec
from vlmflow.errors import UserError

Shot = tuple[bytes, str, str]  # image, question, answer


def with_shots(items: list[Item], index: pl.DataFrame, root: Path, shots: int, seed: int, task: str) -> list[Item]:
    """The items, each with its in-context examples (`Item.context`)."""
    pool = ShardSamples(split_rows(index, "train", "qa"), root)
    if len(pool) < shots:
        raise UserError(f"evaluate {task}: shots {shots} needs as many train samples with QA pairs; found {len(pool)}")
    out = []
    for j, item in enumerate(items):
        rng = np.random.default_rng([seed, j, 27182])
        context = []
        for position in rng.choice(len(pool), shots, replace=False):
            _key, image, record = pool.read(int(position))
            qa = record["qa"][int(rng.integers(len(record["qa"])))]
            context.append((image, qa["question"], qa["answer"]))
        out.append(dataclasses.replace(item, context=tuple(context)))
    return out


def shots_of(items: list[Item]) -> dict:
    """A generate job's `shots` (each item's examples), or nothing when no item has any."""
    return {"shots": [list(item.context) for item in items]} if any(item.context for item in items) else {}


def few_shot_inputs(
    codec: InterleavedCodec, questions: list[str], images: list[bytes], shots: list[list[Shot]], spec: ImageSpec
) -> tuple[list[list[int]], torch.Tensor]:
    """(prompt ids per item, pixels [B, shots + 1, C, H, W]): the examples' images, then the query's."""
    if not isinstance(codec, InterleavedCodec):
        raise ValueError("in-context examples need a Flamingo model (connector kind flamingo)")
    prompts = [codec.prompt(q, [(sq, sa) for _, sq, sa in s]) for q, s in zip(questions, shots, strict=True)]
    pixels = [
        np.stack([preprocess(data, spec) for data in [*(shot[0] for shot in s), image]])
        for image, s in zip(images, shots, strict=True)
    ]
    return prompts, torch.from_numpy(np.stack(pixels))
