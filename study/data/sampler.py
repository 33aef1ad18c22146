"""The training sampler: each process reads its own shard of a seeded permutation, resumable mid-epoch."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler):
    """Each process takes every ``world``-th index of a seeded permutation of the epoch, from ``start`` on.

    The order depends only on (seed, epoch), so a resumed run reads the same samples in the same order.
    The tail that does not fill a whole round of processes is dropped, as DistributedSampler(drop_last=True).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.size // self.world * self.world]
        return iter(order[self.rank::self.world][self.start:].tolist())
