"""Datasets (files, shards, raw photos, the packaged demo set) and augmentation."""

from __future__ import annotations

import logging
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from _landmark_spots import SPOT_CENTRE_TOLERANCE_PX, landmark_spots, spot_centre
from _data_support import StubDetector, demo_records, jpeg_bytes, stub_photo, write_bytes
from _tolerances import U32
from PIL import Image
from torch.utils.data import DataLoader

from pacofr.data.alignment import TEMPLATE_224, resize_points
from pacofr.data.augment import Augment
from pacofr.data.datasets import AlignedFaceDataset, CroppedFaceDataset, RawFolderDataset, ShardFaceDataset
from pacofr.data.image_sets import ArrayImages, open_image_set
from pacofr.data.demo import demo_dataset, demo_root
from pacofr.data.prepare import PrepareConfig, prepare_faces
from pacofr.data.storage import INDEX_NAME, read_jsonl
from pacofr.train.config import load_config
from pacofr.train.fields import ConfigError
from pacofr.train.pretrain import build_dataset, run_pretraining

STORED_POINT_RTOL = 2 * U32
"""Item landmarks are float64 points stored as float32: one rounding (U32 relative); the second U32 covers the
float64 truth here being computed in another order (a few 2^-53 relative)."""


def resized(points: np.ndarray, from_size: int, to_size: int) -> np.ndarray:
    """The truth for points of a resized image: pixel centres at integers (align_corners=False)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * to_size / from_size - 0.5


def flip_tolerance(side: int) -> float:
    """Largest pixel change of an identity or mirror warp of a [0, 1] image ``side`` px wide (grid_sample).

    The float32 grid coordinate g (|g| < 1) is off by <= U32, side / 2 U32 px, and each of the three roundings of
    grid_sample's float32 unnormalisation ((g + 1) side - 1) / 2 by <= side U32 px: the sample lands <= 3.5 side
    U32 px off per axis, which moves a bilinear blend of neighbours differing by <= 1 by as much per axis; the
    blend's own roundings (<= 4 U32) fit in one more side U32. Measured: 1 U32 at side 32, 58 U32 at side 30."""
    return 8 * side * U32


def check_item(item: dict, size: int, uint8: bool = False) -> None:
    assert set(item) == {"image", "landmarks", "index"}
    assert item["image"].dtype == (torch.uint8 if uint8 else torch.float32) and item["image"].shape == (3, size, size)
    if not uint8:
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["landmarks"].dtype == torch.float32 and item["landmarks"].shape == (5, 2)
    assert isinstance(item["index"], int)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The same stub faces prepared as files and as shards."""
    root = tmp_path_factory.mktemp("prepared")
    src = root / "src"
    for number in range(5):
        write_bytes(src, f"p{number}.jpg", jpeg_bytes(stub_photo(1 + number % 2, seed=number)))
    prepare_faces(src, root / "files", PrepareConfig(multi_face="all"), detector_factory=StubDetector())
    prepare_faces(src, root / "shards", PrepareConfig(multi_face="all", output_format="shards", shard_size=4),
                  detector_factory=StubDetector())
    return root


def test_demo_set_is_packaged_and_small():
    root = demo_root()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024
    assert (root / "SOURCES.md").is_file() and (root / "recipe.json").is_file()
    dataset = demo_dataset()
    assert len(dataset) >= 100
    sources = {r["source"] for r in demo_records()}
    assert {"astronaut.png", "grace_hopper.jpg"} <= sources


def test_demo_items_follow_the_contract():
    dataset = demo_dataset()
    records = demo_records()
    for index in (0, 1, len(dataset) - 1):
        item = dataset[index]
        check_item(item, 224)
        assert item["index"] == index
        np.testing.assert_allclose(item["landmarks"].numpy(), records[index]["landmarks"], rtol=STORED_POINT_RTOL,
                                   atol=0)
    small = demo_dataset(image_size=112)[0]
    check_item(small, 112)
    np.testing.assert_allclose(small["landmarks"].numpy(), resized(records[0]["landmarks"], 224, 112),
                               rtol=STORED_POINT_RTOL, atol=0)
    assert dataset[-1]["index"] == len(dataset) - 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataloader_batches():
    loader = DataLoader(demo_dataset(augment=Augment()), batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["landmarks"].shape == (4, 5, 2)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_unreadable_crops_are_skipped_and_counted(prepared, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(prepared / "files", root)
    records = list(read_jsonl(root / INDEX_NAME))
    (root / records[1]["file"]).write_bytes(b"garbage")
    (root / records[2]["file"]).unlink()
    dataset = AlignedFaceDataset(root)
    with caplog.at_level(logging.WARNING, logger="pacofr.data.datasets"):
        item = dataset[1]
    assert item["index"] == 3  # items 1 and 2 are skipped
    check_item(item, 224)
    assert dataset.skipped == 2 and dataset.skipped_indices == {1, 2}
    assert sum("skipping item" in r.message for r in caplog.records) == 2
    for record in records:
        (root / record["file"]).write_bytes(b"")
    with pytest.raises(ValueError, match="could be read"):
        AlignedFaceDataset(root)[0]


def test_shards_and_files_give_the_same_items(prepared):
    files = AlignedFaceDataset(prepared / "files")
    shards = ShardFaceDataset(prepared / "shards")
    assert len(files) == len(shards) == 7
    for index in range(len(files)):
        a, b = files[index], shards[index]
        check_item(b, 224)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["landmarks"], b["landmarks"])
    copy = pickle.loads(pickle.dumps(shards))  # what a DataLoader worker receives
    assert torch.equal(copy[5]["image"], files[5]["image"])
    with pytest.raises(ValueError, match="ShardFaceDataset"):
        AlignedFaceDataset(prepared / "shards")
    with pytest.raises(ValueError, match="AlignedFaceDataset"):
        ShardFaceDataset(prepared / "files")


def test_truncated_shard_is_skipped(prepared, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(prepared / "shards", root)
    last = sorted((root / "shards").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:1024])
    dataset = ShardFaceDataset(root)
    assert dataset[len(dataset) - 1]["index"] == 0  # wrapped round to the first readable item
    assert dataset.skipped >= 1


def test_missing_index_explains_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="pacofr prepare"):
        AlignedFaceDataset(tmp_path)


def test_raw_folder_dataset_aligns_on_the_fly(tmp_path):
    write_bytes(tmp_path, "a.jpg", jpeg_bytes(stub_photo(1, seed=1)))
    write_bytes(tmp_path, "b.jpg", jpeg_bytes(stub_photo(0, seed=2)))  # no face
    write_bytes(tmp_path, "c.jpg", b"broken")
    write_bytes(tmp_path, "d.png", jpeg_bytes(stub_photo(2, seed=3)))
    dataset = RawFolderDataset(tmp_path, detector=StubDetector(), image_size=112)
    assert len(dataset) == 4
    first = dataset[0]
    check_item(first, 112)
    # the stub's face is the template moved by a similarity, which the fit undoes to float64 noise (a few 1e-13 px,
    # far below the float32 rounding)
    np.testing.assert_allclose(first["landmarks"].numpy(), resized(TEMPLATE_224, 224, 112), rtol=STORED_POINT_RTOL,
                               atol=0)
    assert dataset[1]["index"] == 3 and dataset.skipped == 2
    assert dataset.recipe.detector == "stub"


def test_augment_moves_pixels_and_landmarks_together(generator):
    points = resize_points(TEMPLATE_224, 224, 96)
    image = landmark_spots(points)
    augment = Augment(flip_prob=0.5, max_rotation_deg=15, max_scale=0.1, max_shift=0.05,
                      brightness=0, contrast=0, saturation=0)
    seen = set()
    for _ in range(16):
        out, moved = augment(image, torch.from_numpy(points).float(), generator=generator)
        spots = [spot_centre(out, point) for point in moved.numpy()]
        for (centre, _), point in zip(spots, moved.numpy()):
            np.testing.assert_allclose(centre, point, atol=SPOT_CENTRE_TOLERANCE_PX)  # every landmark sits on its spot
        # which original landmark each spot was drawn for, from its brightness order
        drawn_for = tuple(int(k) for k in np.argsort(np.argsort([mass for _, mass in spots])))
        flipped = drawn_for == (1, 0, 2, 4, 3)
        assert flipped or drawn_for == (0, 1, 2, 3, 4)  # a flip swaps exactly left and right
        assert moved[0, 0] < moved[1, 0] and moved[3, 0] < moved[4, 0]  # image-left stays first
        seen.add(flipped)
    assert seen == {True, False}


def test_flip_swaps_left_and_right():
    image = torch.rand(3, 32, 32)
    landmarks = torch.from_numpy(resize_points(TEMPLATE_224, 224, 32)).float()
    flip = Augment(flip_prob=1.0, max_rotation_deg=0, max_scale=0, max_shift=0, brightness=0, contrast=0,
                   saturation=0)
    out, moved = flip(image, landmarks)
    torch.testing.assert_close(out, torch.flip(image, dims=(2,)), atol=flip_tolerance(32), rtol=0)
    expected = landmarks[[1, 0, 2, 4, 3]].clone()
    expected[:, 0] = 31 - expected[:, 0]
    # no jitter: the map x -> 31 - x has exact coefficients, and float64 31 - x rounded to float32 is float32's 31 - x
    assert torch.equal(moved, expected)
    still = Augment(flip_prob=0.0, max_rotation_deg=0, max_scale=0, max_shift=0, brightness=0, contrast=0,
                    saturation=0)
    out, moved = still(image, landmarks)
    torch.testing.assert_close(out, image, atol=flip_tolerance(32), rtol=0)
    assert torch.equal(moved, landmarks)  # the identity map in float64, exact


def test_colour_jitter_stays_in_range_and_is_seeded():
    image = torch.rand(3, 16, 16)
    landmarks = torch.zeros(5, 2) + torch.arange(5).float()[:, None] * 2 + 3
    strong = Augment(brightness=0.9, contrast=0.9, saturation=0.9)
    first = strong(image, landmarks, generator=torch.Generator().manual_seed(3))
    second = strong(image, landmarks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert float(first[0].min()) >= 0.0 and float(first[0].max()) <= 1.0
    with pytest.raises(ValueError, match="flip_prob"):
        Augment(flip_prob=2.0)
    with pytest.raises(ValueError, match="landmarks"):
        strong(image, landmarks[:4])


def _crops(folder, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
        write_bytes(folder, f"{i}.jpg", jpeg_bytes(Image.fromarray(pixels).convert("RGB")))


def test_cropped_faces_are_resized_and_given_the_template_points(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (4, 30, 20), dtype=np.uint8)  # not square, grey
    dataset = CroppedFaceDataset(ArrayImages(grey), image_size=16)
    item = dataset[2]
    check_item(item, 16)
    assert item["index"] == 2
    np.testing.assert_allclose(item["landmarks"].numpy(), resized(TEMPLATE_224, 224, 16), rtol=STORED_POINT_RTOL,
                               atol=0)
    assert torch.equal(item["image"][0], item["image"][2])  # grey replicated
    expected = np.asarray(Image.fromarray(grey[2]).resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_array_equal(item["image"][1].numpy(), expected)  # the same PIL resize and float32 division
    assert dataset.recipe.detector == "none" and dataset.recipe.size == 16
    with pytest.raises(ValueError, match="at least one image"):
        CroppedFaceDataset(ArrayImages(grey[:0]))


def test_unreadable_crops_in_a_zip_are_skipped_and_the_set_pickles(tmp_path):
    _crops(tmp_path / "src", 3, (12, 12))
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as archive:
        for i in range(3):
            archive.write(tmp_path / "src" / f"{i}.jpg", f"f/{i}.jpg")
        archive.writestr("f/3.jpg", b"broken")
    dataset = CroppedFaceDataset(open_image_set(tmp_path / "faces.zip"), image_size=8)
    assert dataset[3]["index"] == 0 and dataset.skipped == 1  # wrapped round to the first readable crop
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker receives
    assert torch.equal(copy[1]["image"], dataset[1]["image"])


def test_build_dataset_reads_crops_where_they_are(tmp_path):
    _crops(tmp_path / "crops" / "a", 5, (20, 24))
    cfg = load_config("demo", ["data.layout=crops", f"data.root={tmp_path / 'crops'}"])
    dataset = build_dataset(cfg.data, 32)
    assert isinstance(dataset, CroppedFaceDataset) and len(dataset) == 5
    check_item(dataset[0], 32, uint8=True)  # the trainer augments the batch on the device
    np.savez(tmp_path / "faces.npz", images=np.zeros((3, 9, 9), dtype=np.uint8))
    assert len(build_dataset(load_config("demo", ["data.layout=crops", f"data.root={tmp_path / 'faces.npz'}"]).data,
                             16)) == 3
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="data.layout=crops"):  # a folder of crops read as a prepared folder
        build_dataset(load_config("demo", [f"data.root={tmp_path / 'crops'}"]).data, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        build_dataset(load_config("demo", ["data.layout=crops", f"data.root={tmp_path / 'none'}"]).data, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing copied or written beside the data


def test_pretraining_runs_on_a_folder_of_crops(tmp_path):
    _crops(tmp_path / "crops", 8, (40, 40))
    cfg = load_config("demo", ["model.preset=tiny", "model.backend=torch", "data.layout=crops",
                               f"data.root={tmp_path / 'crops'}", "train.batch_size=4", "train.total_steps=2",
                               "train.progress=false", "train.viz_every=0", "train.num_viz=2", "train.device=cpu",
                               f"train.out_dir={tmp_path / 'run'}"])
    result = run_pretraining(cfg)
    assert result.step == 2 and result.checkpoint is not None and result.checkpoint.is_dir()
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == [f"{i}.jpg" for i in range(8)]


def test_uint8_items_are_the_float_items_pixels(prepared):
    for dataset_class, folder in ((AlignedFaceDataset, "files"), (ShardFaceDataset, "shards")):
        for size in (224, 96):
            floats = dataset_class(prepared / folder, image_size=size)
            uint8 = dataset_class(prepared / folder, image_size=size, uint8=True)
            for index in (0, len(floats) - 1):
                a, b = floats[index], uint8[index]
                assert b["image"].dtype == torch.uint8 and b["image"].shape == (3, size, size)
                assert torch.equal(a["image"], b["image"].to(torch.float32) / 255.0)
                assert torch.equal(a["landmarks"], b["landmarks"]) and a["index"] == b["index"]
    with pytest.raises(ValueError, match="BatchAugment"):
        AlignedFaceDataset(prepared / "files", uint8=True, augment=Augment())


def test_float_items_keep_pils_decode_and_resize():
    """The truth: PIL decodes the stored crop and resizes it once (bilinear), as before uint8 items."""
    records = demo_records()
    for size in (224, 112):
        item = demo_dataset(image_size=size)[3]
        image = Image.open(demo_root() / records[3]["file"]).convert("RGB")
        if size != 224:
            image = image.resize((size, size), Image.BILINEAR)
        expected = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        np.testing.assert_array_equal(item["image"].numpy(), expected)


def test_cropped_uint8_items_from_a_zip_match_the_array_ones(tmp_path):
    _crops(tmp_path / "src", 3, (20, 20))
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as archive:
        for i in range(3):
            archive.write(tmp_path / "src" / f"{i}.jpg", f"f/{i}.jpg")
    zipped = CroppedFaceDataset(open_image_set(tmp_path / "faces.zip"), image_size=16, uint8=True)
    folder = CroppedFaceDataset(open_image_set(tmp_path / "src"), image_size=16, uint8=True)
    decoded = np.stack([np.asarray(Image.open(tmp_path / "src" / f"{i}.jpg").convert("RGB")) for i in range(3)])
    arrays = CroppedFaceDataset(ArrayImages(decoded), image_size=16, uint8=True)
    for index in range(3):
        assert torch.equal(zipped[index]["image"], arrays[index]["image"])
        assert torch.equal(folder[index]["image"], arrays[index]["image"])
