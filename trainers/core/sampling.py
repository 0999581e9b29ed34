"""Sampling that a resumed run can repeat exactly.

A run killed in the middle of an epoch must, after resuming, see the same batches in the same
order with the same augmentations as a run that was never interrupted. So the item order is a
function of (seed, epoch) only, the sampler can start at any batch of an epoch, and every item
carries a seed of its own from which its random frame choice and crop are drawn, whatever
loader worker happens to load it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, rank-sharded (as DistributedSampler), restartable at (epoch, batch).

    Yields `(index, item_seed)`; wrap the dataset in `SeededItems` to consume them.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if length < world_size:
            raise ValueError(f"{length} training items cannot be shared by {world_size} processes")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = length // world_size  # drop the remainder so ranks stay in step
        # Keep a last partial batch only when there is no full one.
        self.batches_per_epoch = max(1, self.per_rank // batch_size)
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g)
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order().tolist()
        stop = min(len(order), self.batches_per_epoch * self.batch_size)
        for position in range(self.start_batch * self.batch_size, stop):
            index = order[position]
            item_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            yield index, item_seed

    def __len__(self) -> int:
        return max(
            0,
            min(self.per_rank, self.batches_per_epoch * self.batch_size) - self.start_batch * self.batch_size,
        )


class SeededItems(Dataset):
    """`dataset[index]` drawn with python/numpy/torch RNGs seeded from the item's own seed.

    The process's RNG states are restored afterwards, so loading in the main process
    (num_workers=0) leaves the training stream untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
