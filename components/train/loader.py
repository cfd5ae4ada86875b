"""A training worker's batches, step by step: read, decoded and collated in the training thread
(0 loader workers) or ahead of it in worker processes (a torch DataLoader over steps).

What a step trains on is a pure function of (seed, step, rank): the mixture's order of the
step's epoch, the step's slice of it and this rank's share; images are augmented from seeded
draws. So loader processes build exactly the batches the training thread would, in step
order, and a run resumed at step k sees the same batches whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlmflow.components.train.data import Collator
from vlmflow.components.train.data import worker_micro_batches as micro_batches
from vlmflow.components.train.mixture import Resolved

Batch = dict[str, torch.Tensor]
PREFETCH = 2  # steps each loader process prepares ahead


@dataclass(frozen=True)
class Share:
    """Which samples each optimizer step gives this worker, and how it splits them."""

    mixture: Resolved
    seed: int
    steps_per_epoch: int
    batch_size: int
    micro_batch_size: int
    rank: int = 0
    world: int = 1


@dataclass
class Step:
    """One optimizer step of one worker: its micro-batches, ready for the model."""

    step: int
    epoch: int
    parts: list[Batch]
    images: int  # samples in the parts
    flipped: int  # of them mirrored (hflip)
    moved: int  # pixels they were moved by in all (shift), each max(|dx|, |dy|)


class StepBatches(Dataset):
    """Item `step`: the Step this worker trains on at that optimizer step (`pack`, if given, turns
    each collated micro-batch into packed rows)."""

    def __init__(self, collate: Collator, share: Share, pack: Callable[[Batch], Batch] | None = None):
        self.collate, self.share, self.pack = collate, share, pack
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def positions(self, step: int) -> tuple[int, list[np.ndarray]]:
        """(epoch, this worker's micro-batches of sample positions) of optimizer step `step`."""
        s = self.share
        epoch, within = divmod(step, s.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, s.mixture.epoch_positions(s.seed, epoch)
        return epoch, micro_batches(self._order, within, s.batch_size, s.micro_batch_size, s.rank, s.world)

    def __getitem__(self, step: int) -> Step:
        epoch, parts = self.positions(step)
        flipped, moved = self.collate.flipped, self.collate.moved
        batches = [self.collate(positions, epoch) for positions in parts]
        if self.pack is not None:
            batches = [self.pack(batch) for batch in batches]
        images = sum(len(p) for p in parts)
        return Step(step, epoch, batches, images, self.collate.flipped - flipped, self.collate.moved - moved)


def _as_is(step: Step) -> Step:
    return step


def load_steps(batches: StepBatches, start: int, stop: int, workers: int) -> Iterator[Step]:
    """Steps start … stop-1 in order: built here when they are asked for (workers 0), or by `workers`
    processes that each prepare the steps given to them, round robin, ahead of time."""
    if workers == 0:
        return (batches[step] for step in range(start, stop))
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=PREFETCH,
        # Not forked from this process: a Ray Train worker (or any process with Ray, gRPC or a
        # process group in it) does not survive being copied mid-flight; a fork server starts
        # clean and forks the loader processes from there.
        multiprocessing_context="forkserver",
    )
    return iter(loader)
