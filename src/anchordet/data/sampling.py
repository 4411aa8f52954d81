"""Training order and augmentation as a pure function of (seed, epoch): exact resume.

A `RandomSampler` draws its permutation, and the transforms their flips and jitter, from torch's
global generator. After `ckpt_path=last.ckpt` that generator is in a different state than it would
have been had the run not stopped, so the resumed epochs see other batches and the weights drift
from an uninterrupted run. Here the permutation is seeded by (seed, epoch) and every sample's
augmentation by (seed, epoch, position), so epoch e is the same whether or not the run restarted,
in any worker process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


def augmentation_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, position), stable across processes
    (Python's `hash` is salted per process, so it is not used)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochShuffleSampler(Sampler):
    """Yields `(position, epoch)` in an order seeded by (seed, epoch).

    `current_epoch` is read when iteration starts (Lightning's `trainer.current_epoch`), so a run
    resumed at epoch e reproduces epoch e's order without any sampler state in the checkpoint.
    Lightning wraps it in a distributed sampler under DDP; the pairs pass through unchanged.
    """

    def __init__(self, num_items: int, seed: int, current_epoch: Callable[[], int]) -> None:
        self.num_items, self.seed, self.current_epoch = int(num_items), int(seed), current_epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.current_epoch())
        generator = torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, -1))
        order = torch.randperm(self.num_items, generator=generator).tolist()
        return iter([(position, epoch) for position in order])
