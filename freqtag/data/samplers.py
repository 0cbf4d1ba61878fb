"""The samplers: every random choice of the input pipeline (which crop, in which order), from ``(seed, epoch)``.

The choices are made here, never inside a loader worker, so a run gives the
same batches with 0 or N workers, after a resume, and under DDP.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["CropSampler", "TrackSampler"]


def _seed_for(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


class CropSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (item, start frame): one uniformly random crop per track per epoch.

    ``batch_size`` is the global batch; under DDP each of ``world_size`` ranks
    takes its share of every global batch, so the set of crops in an epoch
    does not depend on the number of ranks. The last, partial batch is kept
    only if every rank gets ``min_last`` crops of it: 2 for training, since
    BatchNorm in training mode needs two values per channel (a rank's one
    crop at input_length=32 gives one); 1 for evaluation.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        input_length: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        centre: bool = False,
        rank: int = 0,
        world_size: int = 1,
        min_last: int = 2,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.input_length = input_length
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.centre = centre
        self.rank = rank
        self.world_size = world_size
        self.min_last = min_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def crops(self) -> tuple[np.ndarray, np.ndarray]:
        """(items in epoch order, start frames) for the current epoch."""
        n = len(self.lengths)
        rng = _seed_for(self.seed, self.epoch, 1)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        room = np.maximum(self.lengths - self.input_length, 0)
        if self.centre:
            starts = room // 2
        else:
            starts = np.floor(rng.random(n) * (room + 1)).astype(np.int64)
        return order, starts[order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, starts = self.crops()
        for b in range(0, len(self), 1):
            items = order[b * self.batch_size : (b + 1) * self.batch_size]
            first = starts[b * self.batch_size : (b + 1) * self.batch_size]
            share = slice(self.rank, None, self.world_size)
            yield list(zip(items[share].tolist(), first[share].tolist()))

    def __len__(self) -> int:
        """Batches per epoch; a last batch too small to give every rank ``min_last`` crops is left out."""
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest // self.world_size >= self.min_last)  # the last rank's share is the smallest


class TrackSampler(Sampler[list[int]]):
    """One whole track per batch, this rank's share only, never padded with repeats.

    A DistributedSampler would repeat tracks to even out the ranks; a repeated
    track would be scored twice, so each rank takes items rank, rank+W, ...
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.items = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[list[int]]:
        return iter([i] for i in self.items)

    def __len__(self) -> int:
        return len(self.items)
