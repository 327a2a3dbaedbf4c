"""DeviceBatches (uint8 batches to float batches on the device, one ahead), worker counts, rank shards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from pacofr.data.batch_augment import BatchAugment
from pacofr.data.demo import demo_dataset
from pacofr.data.loading import DeviceBatches, default_num_workers, local_world_size
from pacofr.data.rank_shards import ShardRankSampler, assign_shards, rank_shard_sampler


def uint8_loader(count: int = 12, size: int = 32) -> DataLoader:
    dataset = torch.utils.data.Subset(demo_dataset(image_size=size, uint8=True), range(count))
    return DataLoader(dataset, batch_size=4, shuffle=False)


def test_batches_arrive_as_float_in_unit_range_in_order():
    loader = uint8_loader()
    batches = list(DeviceBatches(loader, "cpu"))
    raw = list(loader)
    assert len(batches) == len(raw) == 3
    for got, sent in zip(batches, raw):
        assert sent["image"].dtype == torch.uint8
        assert got["image"].dtype == torch.float32 and got["image"].shape == (4, 3, 32, 32)
        assert torch.equal(got["image"], sent["image"].to(torch.float32) / 255.0)
        assert torch.equal(got["landmarks"], sent["landmarks"]) and torch.equal(got["index"], sent["index"])


def test_augmentation_follows_the_batch_order_whatever_the_prefetching():
    loader = uint8_loader()
    direct = BatchAugment(seed=8)
    expected = [direct(batch["image"], batch["landmarks"]) for batch in loader]
    got = list(DeviceBatches(loader, "cpu", augment=BatchAugment(seed=8)))
    for batch, (images, landmarks) in zip(got, expected):
        assert torch.equal(batch["image"], images) and torch.equal(batch["landmarks"], landmarks)
        assert batch["landmarks"].device.type == "cpu"


def test_an_empty_loader_gives_no_batches():
    assert list(DeviceBatches([], "cpu")) == []


def test_worker_count_follows_the_cores_and_the_ranks(monkeypatch):
    assert default_num_workers("cpu", ranks_on_host=1, cores=16) == 0  # the CPU step owns the cores
    assert default_num_workers("cuda", ranks_on_host=1, cores=16) == 15  # one core feeds the device
    assert default_num_workers("cuda", ranks_on_host=8, cores=16) == 1
    assert default_num_workers("cuda", ranks_on_host=16, cores=16) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_world_size() == 4 and default_num_workers("cuda", cores=16) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        local_world_size()


def shard_records(sizes: list[int]) -> list[dict]:
    return [{"shard": f"s{number}.tar"} for number, size in enumerate(sizes) for _ in range(size)]


def test_every_shard_is_read_by_one_rank_only():
    records = shard_records([5, 5, 4, 3, 3, 1])  # 21 items
    per_rank = assign_shards([r["shard"] for r in records], 3)
    assert sorted(i for rank in per_rank for i in rank) == list(range(21))
    shards_per_rank = [{records[i]["shard"] for i in rank} for rank in per_rank]
    assert all(not (a & b) for n, a in enumerate(shards_per_rank) for b in shards_per_rank[n + 1:])
    sizes = [len(rank) for rank in per_rank]
    assert max(sizes) - min(sizes) <= 5  # less than the largest shard apart
    with pytest.raises(ValueError, match="2 shard"):
        assign_shards(["a", "a", "b"], 3)


def test_rank_sampler_epochs_are_reproducible_and_resumable():
    records = shard_records([6, 5, 4, 4])  # 19 items, 2 ranks: 10 per rank per epoch
    samplers = [ShardRankSampler(records, 2, rank, seed=1) for rank in range(2)]
    assert [s.num_samples for s in samplers] == [10, 10]
    assert [len(s.own) for s in samplers] == [10, 9]  # shards 6 + 4 and 5 + 4
    for sampler in samplers:
        order = list(sampler)
        assert len(order) == 10 and set(order) == set(sampler.own)  # every own item; rank 1 repeats one
    first = samplers[0]
    epoch0 = list(first)
    first.set_position(1)
    epoch1 = list(first)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    first.set_position(1, start=4)
    assert list(first) == epoch1[4:] and len(first) == 6
    with pytest.raises(ValueError, match="start"):
        first.set_position(0, start=11)
    with pytest.raises(ValueError, match="shard"):
        ShardRankSampler([{"file": "a.jpg"}])


@pytest.mark.gpu
def test_cuda_batches_match_the_cpu_ones():
    loader = uint8_loader()
    cpu = list(DeviceBatches(loader, "cpu", augment=BatchAugment(seed=5)))
    cuda = list(DeviceBatches(loader, "cuda", augment=BatchAugment(seed=5)))
    for a, b in zip(cpu, cuda):
        assert b["image"].device.type == "cuda" and torch.equal(a["landmarks"], b["landmarks"])
        # grid_sample on CUDA and on the CPU: float32 roundings of the grid (test_data_batch_augment)
        torch.testing.assert_close(b["image"].cpu(), a["image"], atol=2 * 8 * 2.0**-24 * 32, rtol=0)


def test_float_batches_pass_without_a_second_augmentation():
    loader = DataLoader(torch.utils.data.Subset(demo_dataset(image_size=32), range(8)), batch_size=4)
    for got, sent in zip(DeviceBatches(loader, "cpu", augment=BatchAugment(seed=1)), loader):
        assert torch.equal(got["image"], sent["image"]) and torch.equal(got["landmarks"], sent["landmarks"])


def test_rank_shard_sampler_only_for_several_ranks_over_enough_shards():
    class Sharded(torch.utils.data.Dataset):
        def __init__(self, records):
            self.records = records

    records = shard_records([3, 3, 2])
    assert rank_shard_sampler(Sharded(records), 1, 0, seed=0) is None  # one rank: the usual order
    assert rank_shard_sampler(Sharded(records), 4, 0, seed=0) is None  # fewer shards than ranks
    assert rank_shard_sampler(Sharded([{"file": "a.jpg"}] * 4), 2, 0, seed=0) is None  # image files
    sampler = rank_shard_sampler(Sharded(records), 2, 1, seed=0)
    assert isinstance(sampler, ShardRankSampler) and sampler.num_samples == 4
