"""The training sampler: an order that is a function of (seed, epoch), DDP shards as torch's
DistributedSampler makes them, and a position in the epoch that survives a checkpoint."""

import pytest
import torch
from torch.utils.data import DistributedSampler

from anchordet.data.sampling import EpochShuffleSampler, ResumableDataLoader


def sampler(num_items=10, epoch=0, done=0, rank=0, world=1, seed=3):
    return EpochShuffleSampler(num_items, seed, lambda: epoch, samples_done=lambda: done,
                               rank=lambda: rank, world_size=lambda: world)


def positions(s):
    return [position for position, _ in s]


def test_order_depends_on_seed_and_epoch_only():
    assert positions(sampler()) == positions(sampler())
    assert sorted(positions(sampler())) == list(range(10))
    assert positions(sampler(epoch=1)) != positions(sampler(epoch=0))
    assert positions(sampler(seed=4)) != positions(sampler(seed=3))
    assert {epoch for _, epoch in sampler(epoch=5)} == {5}


@pytest.mark.parametrize("num_items,world", [(10, 2), (11, 3), (5, 4)])
def test_shards_equal_torchs_distributed_sampler_on_the_same_order(num_items, world):
    order = sampler(num_items).epoch_order(0)  # the undivided epoch

    class Ordered(torch.utils.data.Dataset):
        def __len__(self):
            return num_items

    for rank in range(world):
        shard = sampler(num_items, rank=rank, world=world)
        reference = DistributedSampler(Ordered(), num_replicas=world, rank=rank, shuffle=False)
        assert len(shard) == len(reference)
        assert positions(shard) == [order[i] for i in reference]


def test_a_resumed_epoch_starts_after_the_samples_already_trained():
    full = positions(sampler(epoch=2))
    saved = sampler(epoch=2, done=4).state_dict()
    assert saved == {"epoch": 2, "samples_done": 4, "world_size": 1}
    resumed = sampler(epoch=2)
    resumed.load_state_dict(saved)
    assert positions(resumed) == full[4:]
    assert positions(resumed) == full  # only the first epoch after the restore is shortened
    assert len(resumed) == 10  # the length the training loop counts batches from stays the epoch's

    # A checkpoint taken at the end of epoch 2 skips nothing of epoch 3.
    later = sampler(epoch=3)
    later.load_state_dict(sampler(epoch=2, done=10).state_dict())
    assert positions(later) == positions(sampler(epoch=3))


def test_resuming_mid_epoch_on_another_number_of_processes_is_refused():
    two_ranks = sampler(world=2)
    two_ranks.load_state_dict({"epoch": 0, "samples_done": 0, "world_size": 1})  # nothing to skip: fine
    two_ranks.load_state_dict({"epoch": 0, "samples_done": 10, "world_size": 1})  # a finished epoch: fine
    with pytest.raises(ValueError, match="trainer.devices"):
        two_ranks.load_state_dict({"epoch": 0, "samples_done": 4, "world_size": 1})


def test_the_loader_hands_its_samplers_state_to_lightning():
    loader = ResumableDataLoader(list(range(10)), batch_size=2, sampler=sampler(done=6))
    assert loader.state_dict()["samples_done"] == 6
    plain = ResumableDataLoader(list(range(10)), batch_size=2)
    assert plain.state_dict() == {}
    plain.load_state_dict({})  # a sampler without state ignores it
