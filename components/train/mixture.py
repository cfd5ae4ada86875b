"""Dataset mixtures: how many samples each component of a stage's data gives per epoch, and
which ones, as pure functions of (spec, available rows, seed, epoch).

Counts are resolved once per stage: fixed `count`s first, then `weight`s share the rest of
`total` by largest remainder. Without `total`, the weights scale up until the scarcest
component drawn without replacement gives all its rows (a single plain artifact: all its rows).
Each epoch draws every component's subset (without replacement: distinct rows; with: any),
then one permutation orders the epoch; `reshuffle: false` keeps epoch 0's draw and order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlmflow.components.train.data import epoch_order
from vlmflow.specs.train import MixtureComponent, TrainStageSpec


class MixtureError(ValueError):
    """A mixture that cannot be resolved; `field` is the spec path of the value to change."""

    def __init__(self, field: tuple, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class Resolved:
    """A resolved mixture: per component, the rows it has and the samples it gives per epoch."""

    labels: list[str]  # "DATA/FORMAT"
    available: list[int]
    counts: list[int]
    replacement: list[bool]
    reshuffle: bool

    @property
    def total(self) -> int:
        return sum(self.counts)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.available).tolist()][:-1]

    def epoch_positions(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's samples, in training order, as positions into the components' rows
        stacked in order."""
        draw_epoch = epoch if self.reshuffle else 0
        parts = []
        for j, (offset, n, count, replace) in enumerate(
            zip(self.offsets(), self.available, self.counts, self.replacement, strict=True)
        ):
            if count == n and not replace:
                parts.append(offset + np.arange(n))
                continue
            rng = np.random.default_rng([seed, draw_epoch, 104729, j])
            picked = rng.integers(0, n, count) if replace else rng.choice(n, count, replace=False)
            parts.append(offset + np.sort(picked))
        drawn = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return drawn[epoch_order(len(drawn), seed, draw_epoch)]

    def as_dict(self) -> dict:
        return {
            "labels": self.labels,
            "available": self.available,
            "counts": self.counts,
            "replacement": self.replacement,
            "reshuffle": self.reshuffle,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Resolved:
        return cls(**raw)


def component_label(stage: TrainStageSpec, component: MixtureComponent) -> str:
    return f"{component.data}/{component.format or stage.format}"


def component_field(stage: TrainStageSpec, j: int, name: str | None = None) -> tuple:
    """The spec path of component j (or one of its fields) inside `stages[i]`."""
    if isinstance(stage.data, str):
        return ("data",)
    return ("data", "mixture", j, *((name,) if name else ()))


def resolve(stage: TrainStageSpec, available: list[int]) -> Resolved:
    """Samples per epoch for each component, given the training rows each one has."""
    components = stage.components()
    labels = [component_label(stage, c) for c in components]
    for j, n in enumerate(available):
        if n == 0:
            raise MixtureError(component_field(stage, j), f"{labels[j]} has no training samples")
    cap = stage.data.total if not isinstance(stage.data, str) else None
    counts: list[int | None] = [c.count for c in components]
    weighted = [j for j, c in enumerate(components) if c.count is None]
    fixed = sum(c for c in counts if c is not None)
    if weighted and cap is None:
        for j, share in zip(weighted, _uncapped(components, weighted, available), strict=True):
            counts[j] = share
    elif weighted:
        weights = [components[j].weight or 1.0 for j in weighted]
        if fixed >= cap:
            raise MixtureError(("data", "total"), f"total {cap} leaves nothing for the weighted components "
                               f"after the fixed counts ({fixed})")  # fmt: skip
        for j, share in zip(weighted, largest_remainder(cap - fixed, weights), strict=True):
            counts[j] = share
    elif cap is not None and fixed > cap:
        counts = largest_remainder(cap, [float(c) for c in counts])
    for j, (component, count) in enumerate(zip(components, counts, strict=True)):
        if not component.replacement and count > available[j]:
            field = component_field(stage, j, "count" if component.count is not None else None)
            raise MixtureError(
                field,
                f"{count} samples of {labels[j]} per epoch, but it has {available[j]}; "
                "lower the count (or total), or set replacement: true",
            )
        if count == 0:
            raise MixtureError(component_field(stage, j), f"{labels[j]} gets no samples; raise its weight or total")
    reshuffle = stage.data.reshuffle if not isinstance(stage.data, str) else True
    return Resolved(labels, list(available), [int(c) for c in counts], [c.replacement for c in components], reshuffle)


def _uncapped(components: list[MixtureComponent], weighted: list[int], available: list[int]) -> list[int]:
    """Without a total: the weights scaled up until a component drawn without replacement has
    all its rows (that component gives exactly them)."""
    scarce = [available[j] / (components[j].weight or 1.0) for j in weighted if not components[j].replacement]
    if not scarce:
        raise MixtureError(("data", "total"), "every weighted component draws with replacement: set total")
    scale = min(scarce)
    counts = []
    for j in weighted:
        share = math.floor(scale * (components[j].weight or 1.0) + 0.5)
        counts.append(share if components[j].replacement else min(share, available[j]))
    return counts


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to `weights` into integers that sum to `total`."""
    share = sum(weights)
    exact = [total * w / share for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda j: (counts[j] - exact[j], j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


def used_positions(resolved: Resolved, seed: int, batch_size: int, total_steps: int) -> np.ndarray:
    """Every position some optimizer step of the stage trains on (for the unused-rows report)."""
    per_epoch = resolved.total // batch_size
    used = []
    for epoch in range(math.ceil(total_steps / per_epoch)):
        steps = min(per_epoch, total_steps - epoch * per_epoch)
        used.append(resolved.epoch_positions(seed, epoch)[: steps * batch_size])
        if not resolved.reshuffle and epoch == 0 and steps == per_epoch:
            break
    return np.unique(np.concatenate(used))
