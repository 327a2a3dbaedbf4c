"""DeviceBatches (uint8 batches, or JPEG bytes decoded there, to float batches on the device, one
ahead), encoded items and the trainer's data.decode_on_device, worker counts, rank shards."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from _data_support import StubDetector, jpeg_bytes, stub_photo, write_bytes
from _tolerances import U32
from _train_standin import IMG, StandInModel, region_fn, tiny_config
from torch.utils.data import DataLoader

from pacofr.data.batch_augment import BatchAugment
from pacofr.data.datasets import AlignedFaceDataset, CroppedFaceDataset, ShardFaceDataset
from pacofr.data.demo import demo_dataset, demo_root
from pacofr.data.encoded_items import EncodedAlignedFaceDataset, EncodedShardFaceDataset, encoded_items
from pacofr.data.image_sets import open_image_set
from pacofr.data.loading import DeviceBatches, default_num_workers, local_world_size
from pacofr.data.prepare import PrepareConfig, prepare_faces
from pacofr.data.rank_shards import ShardRankSampler, assign_shards, rank_shard_sampler
from pacofr.data.storage import read_index
from pacofr.train.fields import ConfigError
from pacofr.train.trainer import Trainer


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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Stub faces prepared at IMG px (the stand-in model's size) as files and as shards."""
    root = tmp_path_factory.mktemp("prepared")
    for number in range(6):
        write_bytes(root / "src", f"p{number}.jpg", jpeg_bytes(stub_photo(1 + number % 2, seed=number)))
    for fmt in ("files", "shards"):
        prepare_faces(root / "src", root / fmt, PrepareConfig(multi_face="all", image_size=IMG, output_format=fmt,
                                                              shard_size=4), detector_factory=StubDetector())
    return root


def test_encoded_batches_decode_to_the_uint8_batches(prepared):
    """Same bytes, same decoder: the batches of encoded items decoded (and augmented) where the
    step runs are those of the uint8 items, bit for bit, for files and shards."""
    for plain, encoded in ((AlignedFaceDataset, EncodedAlignedFaceDataset), (ShardFaceDataset, EncodedShardFaceDataset)):
        root = prepared / ("files" if plain is AlignedFaceDataset else "shards")
        items = encoded(root, image_size=IMG)
        assert isinstance(items[0]["image"], bytes)
        expected = list(DeviceBatches(DataLoader(plain(root, image_size=IMG, uint8=True), batch_size=3),
                                      "cpu", augment=BatchAugment(seed=2)))
        got = list(DeviceBatches(DataLoader(items, batch_size=3), "cpu", augment=BatchAugment(seed=2)))
        assert len(got) == len(expected) >= 2
        for a, b in zip(got, expected):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["landmarks"], b["landmarks"])
            assert torch.equal(a["index"], b["index"])


def test_encoded_items_only_for_prepared_crops_at_the_training_size(prepared, tmp_path):
    assert isinstance(encoded_items(demo_dataset(uint8=True)), EncodedAlignedFaceDataset)
    assert isinstance(encoded_items(ShardFaceDataset(prepared / "shards", image_size=IMG)), EncodedShardFaceDataset)
    with pytest.raises(ValueError, match="224 px crops, not 64 px"):
        encoded_items(demo_dataset(image_size=64, uint8=True))
    with pytest.raises(ValueError, match="CroppedFaceDataset has no stored JPEG crops"):
        encoded_items(CroppedFaceDataset(open_image_set(demo_root() / "images"), image_size=32))
    bad = tmp_path / "bad"
    shutil.copytree(prepared / "files", bad)
    first = bad / read_index(bad)[0]["file"]
    first.write_bytes(b"not a jpeg")  # an unusable crop is skipped, as in uint8 items
    dataset = EncodedAlignedFaceDataset(bad, image_size=IMG)
    assert dataset[0]["index"] == 1 and dataset.skipped == 1


def _train(out: Path, dataset, decode_on_device: bool) -> tuple[Trainer, list[str]]:
    cfg = tiny_config(str(out), max_steps=4, epochs=2, num_viz=2, viz_every=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode_on_device=decode_on_device))
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, StandInModel(), dataset, region_fn=region_fn)
    result = trainer.fit()
    with open(result.scalars, newline="") as handle:
        return trainer, [row["loss"] for row in csv.DictReader(handle)]


def test_the_trainer_decodes_on_the_device_when_asked(prepared, tmp_path):
    dataset = ShardFaceDataset(prepared / "shards", image_size=IMG, uint8=True)
    trainer, losses = _train(tmp_path / "bytes", dataset, True)
    assert isinstance(trainer.dataset.dataset, EncodedShardFaceDataset) and len(losses) == 4  # it read JPEG bytes
    assert losses == _train(tmp_path / "pixels", dataset, False)[1]  # and trained on the same pixels
    assert (tmp_path / "bytes" / "reconstructions.png").is_file()  # the viz batch is decoded too
    crops = CroppedFaceDataset(open_image_set(demo_root() / "images"), image_size=IMG, uint8=True)
    with pytest.raises(ConfigError, match="data.decode_on_device=true: a CroppedFaceDataset"):
        _train(tmp_path / "crops", crops, True)


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
        torch.testing.assert_close(b["image"].cpu(), a["image"], atol=2 * 8 * U32 * 32, rtol=0)


@pytest.mark.gpu
def test_nvjpeg_batches_match_the_cpu_ones(prepared, tmp_path):
    """Encoded items decoded by nvJPEG on the side stream, one batch ahead, against the CPU decode
    (the crops re-encoded grey, so that no chroma upsampling differs between the decoders)."""
    grey = tmp_path / "grey"
    shutil.copytree(prepared / "files", grey)
    for record in read_index(grey):
        path = grey / record["file"]
        path.write_bytes(jpeg_bytes(Image.open(path).convert("L")))
    loader = DataLoader(EncodedAlignedFaceDataset(grey, image_size=IMG), batch_size=3)
    cpu = list(DeviceBatches(loader, "cpu"))
    cuda = list(DeviceBatches(loader, "cuda"))
    assert len(cuda) == len(cpu) >= 2
    for a, b in zip(cpu, cuda):
        assert b["image"].device.type == "cuda" and torch.equal(a["landmarks"], b["landmarks"])
        # the decoders differ only in their IDCT, which IEEE 1180 lets err by at most 1 level per
        # pixel (as test_data_decode's nvJPEG test); both sides divide by 255 the same way
        assert float((b["image"].cpu() - a["image"]).abs().max()) <= 1 / 255 + 1e-6


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
