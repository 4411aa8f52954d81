"""Training order and augmentation as a pure function of (seed, epoch), and a position in the epoch
that goes into every checkpoint: exact resume, at an epoch boundary or in the middle of one.

A `RandomSampler` draws its permutation, and the transforms their flips and jitter, from torch's
global generator. After a resume that generator is in another state than it would have been had the
run not stopped, so the resumed epochs see other batches and the weights drift from an uninterrupted
run. Here the permutation is seeded by (seed, epoch) and every sample's augmentation by (seed,
epoch, position), so epoch e is the same whether or not the run restarted, in any worker process.

Within an epoch, the sampler reports how far training got (`state_dict`, which Lightning stores in
the checkpoint through `ResumableDataLoader`) and, after `load_state_dict`, starts the interrupted
epoch after the samples already trained. Under DDP it also shards the epoch over the ranks itself
(as torch's `DistributedSampler` does: pad to a multiple of the world size, rank r takes every
W-th sample from r), because skipping inside a sampler that Lightning then wraps would shift the
shards; the DDP trainer config sets ``use_distributed_sampler: false`` for that reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def augmentation_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, position), stable across processes
    (Python's `hash` is salted per process, so it is not used)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochShuffleSampler(Sampler):
    """Yields `(position, epoch)` pairs of this rank's shard, in an order seeded by (seed, epoch).

    Args:
        num_items: dataset length.
        seed: the shuffle seed (``data.shuffle_seed``).
        current_epoch: read when iteration starts (Lightning's ``trainer.current_epoch``), so a run
            resumed at epoch e reproduces epoch e's order.
        samples_done: how many of this rank's samples of the current epoch training has used, read
            when a checkpoint is written (``state_dict``).
        rank, world_size: read when iteration starts; 0 and 1 without DDP.
    """

    def __init__(self, num_items: int, seed: int, current_epoch: Callable[[], int],
                 samples_done: Callable[[], int] = lambda: 0, rank: Callable[[], int] = lambda: 0,
                 world_size: Callable[[], int] = lambda: 1) -> None:
        self.num_items, self.seed = int(num_items), int(seed)
        self.current_epoch, self.samples_done = current_epoch, samples_done
        self.rank, self.world_size = rank, world_size
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip), used by the next __iter__

    def __len__(self) -> int:
        # One shard, padded as DistributedSampler pads (drop_last=False); constant, also on resume,
        # because the training loop counts an epoch's batches from it.
        world = int(self.world_size())
        return -(-self.num_items // world)

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's positions for ``epoch``, in training order."""
        generator = torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, -1))
        order = torch.randperm(self.num_items, generator=generator).tolist()
        world, rank = int(self.world_size()), int(self.rank())
        order += order[: len(self) * world - len(order)]  # pad to a multiple of the world size
        return order[rank::world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.current_epoch())
        skip = 0
        if self._resume is not None:
            resume_epoch, skip = self._resume
            self._resume = None
            skip = skip if resume_epoch == epoch else 0
        return iter([(position, epoch) for position in self.epoch_order(epoch)[skip:]])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.current_epoch()), "samples_done": int(self.samples_done()),
                "world_size": int(self.world_size())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved_world, done = int(state.get("world_size", 1)), int(state["samples_done"])
        mid_epoch = 0 < done < -(-self.num_items // saved_world)
        if saved_world != int(self.world_size()) and mid_epoch:
            raise ValueError(
                f"the checkpoint was written by a run on {state.get('world_size')} processes and this one has "
                f"{self.world_size()}: the epoch's shards differ, so training cannot continue mid-epoch. Resume "
                "with the same trainer.devices x trainer.num_nodes, or from an end-of-epoch last.ckpt")
        self._resume = (int(state["epoch"]), int(state["samples_done"]))


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning recognises as resumable (it has ``state_dict`` and
    ``load_state_dict``): its sampler's position in the epoch is saved with every checkpoint and
    restored before the resumed run iterates. A sampler without state gives an empty state."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)
