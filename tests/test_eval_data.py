"""Image sets, labelled-set readers, splits and the checks that keep numbers honest."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_helpers import jpeg
from PIL import Image

from pacofr.data.image_io import UnreadableImageError
from pacofr.data.image_sets import (
    ArrayImages,
    ConcatImages,
    EncodedImages,
    SubsetImages,
    ZipImages,
    open_image_set,
)
from pacofr.eval.labelled import LabelledSet, Targets, check_labelled, class_targets, sort_class_names
from pacofr.eval.readers import DataOptions, read_labelled
from pacofr.eval.splits import SPLIT_FRACTIONS, carve_validation, hash_splits, parse_split_names, split_of


def _rgb(seed: int, height: int = 10, width: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- image sets
def test_image_sets_decode_every_layout_to_rgb(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (3, 9, 7), dtype=np.uint8)
    arrays = ArrayImages(grey)
    assert len(arrays) == 3 and arrays.read(1).shape == (9, 7, 3)
    assert np.array_equal(arrays.read(1)[:, :, 2], grey[1]) and np.array_equal(arrays.read(-1)[:, :, 0], grey[2])
    floats = ArrayImages(grey.astype(np.float32) / 255.0)
    assert np.array_equal(floats.read(0), arrays.read(0))
    with pytest.raises(ValueError, match="must lie in"):
        ArrayImages(grey.astype(np.float32) * 2.0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ArrayImages(np.zeros((2, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        arrays.read(3)

    pngs = [np.asarray(Image.fromarray(_rgb(i))) for i in range(3)]
    encoded = [np.frombuffer(_png(p), dtype=np.uint8) for p in pngs]
    offsets = np.cumsum([0] + [len(e) for e in encoded])
    flat = EncodedImages(np.concatenate(encoded), offsets)
    assert all(np.array_equal(flat.read(i), pngs[i]) for i in range(3))  # PNG is lossless
    with pytest.raises(ValueError, match="offsets"):
        EncodedImages(np.concatenate(encoded), offsets[::-1])

    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as archive:
        for i, p in enumerate(pngs):
            archive.writestr(f"a/{i}.png", _png(p))
        archive.writestr("notes.txt", "not an image")
    zipped = open_image_set(tmp_path / "faces.zip")
    assert zipped.keys == ["a/0.png", "a/1.png", "a/2.png"] and np.array_equal(zipped.read(2), pngs[2])
    with pytest.raises(ValueError, match="not members"):
        ZipImages(tmp_path / "faces.zip", ["a/9.png"])

    (tmp_path / "folder" / "x").mkdir(parents=True)
    for i, p in enumerate(pngs):
        Image.fromarray(p).save(tmp_path / "folder" / "x" / f"{i}.png")
    folder = open_image_set(tmp_path / "folder")
    assert folder.keys == ["x/0.png", "x/1.png", "x/2.png"] and np.array_equal(folder.read(0), pngs[0])

    np.savez(tmp_path / "set.npz", images=grey)
    assert np.array_equal(open_image_set(tmp_path / "set.npz").read(0), arrays.read(0))
    np.savez(tmp_path / "none.npz", pixels=grey)
    with pytest.raises(ValueError, match="holds no images"):
        open_image_set(tmp_path / "none.npz")
    with pytest.raises(FileNotFoundError):
        open_image_set(tmp_path / "missing")

    joined = ConcatImages([SubsetImages(arrays, [2, 0]), folder], prefixes=["g/", "f/"])
    assert joined.keys == ["g/array[2]", "g/array[0]", "f/x/0.png", "f/x/1.png", "f/x/2.png"]
    assert np.array_equal(joined.read(1), arrays.read(0)) and np.array_equal(joined.read(4), pngs[2])


def test_a_corrupt_member_is_named(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.writestr("x.jpg", b"not a jpeg")
    with pytest.raises(UnreadableImageError, match="x.jpg"):
        open_image_set(tmp_path / "bad.zip").read(0)


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- splits
def test_hash_split_is_stable_close_to_the_fractions_and_keeps_groups_together() -> None:
    keys = [f"id{i // 10}/img{i}.jpg" for i in range(4000)]
    splits = hash_splits(keys)
    assert splits == hash_splits(keys[::-1])[::-1] and splits[0] == split_of(keys[0])
    for name, frac in SPLIT_FRACTIONS.items():
        assert abs(splits.count(name) / len(keys) - frac) < 0.03
    groups = [k.split("/")[0] for k in keys]
    by_group = hash_splits(groups)
    for group in set(groups):
        assert len({s for s, g in zip(by_group, groups, strict=True) if g == group}) == 1


def test_validation_is_carved_per_class_from_train_only() -> None:
    splits = ["train"] * 50 + ["test"] * 10
    classes = [i % 5 for i in range(60)]
    groups = [f"g{i}" for i in range(60)]
    carved = carve_validation(splits, groups, classes)
    assert carved[50:] == ["test"] * 10  # test untouched
    for cls in range(5):  # 10 train images per class: round(0.15 * 10) = 2 go to val
        assert sum(1 for s, c in zip(carved, classes, strict=True) if s == "val" and c == cls) == 2
    assert carve_validation(carved, groups, classes) == carved  # a set with val is left alone
    two = carve_validation(["train", "train", "test"], ["a", "b", "c"], [0, 0, 1])
    assert two.count("val") == 1  # a class with 2 train groups gives one to val
    grouped = carve_validation(["train"] * 40, [f"p{i // 4}" for i in range(40)])
    for person in range(10):
        assert len({s for i, s in enumerate(grouped) if i // 4 == person}) == 1


def test_split_names_are_read_or_refused() -> None:
    assert parse_split_names(["Train", "TEST", "valid", "0", 1, 2], "split") == \
        ["train", "test", "val", "train", "test", "val"]
    with pytest.raises(ValueError, match="split column 'part'.*'holdout'"):
        parse_split_names(["train", "holdout"], "part")


# ---------------------------------------------------------------------------------------------- labels
def test_numeric_class_names_sort_as_numbers() -> None:
    assert sort_class_names({"10", "2", "1"}) == ["1", "2", "10"]
    assert sort_class_names({"b", "10", "a"}) == ["10", "a", "b"]
    targets = class_targets(["10", "2", "2"], ["r1", "r2", "r3"])
    assert targets.names == ["2", "10"] and targets.values.tolist() == [1, 0, 0]


def _write_images(folder: Path, count: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        pixels = _rgb(i, size[1], size[0])
        image = Image.fromarray(pixels).convert(mode)
        image.save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names


def test_csv_reader_classes_regression_split_and_groups(tmp_path: Path) -> None:
    names = _write_images(tmp_path / "img", 40, mode="L")  # grey images of any size
    lines = ["path,label,age,split,person"] + [
        f"{n},{'cat' if i % 2 else 'dog'},{20 + i},{'test' if i >= 30 else 'train'},p{i // 4}" for i, n in enumerate(names)]
    (tmp_path / "faces.csv").write_text("\n".join(lines) + "\n")
    data = read_labelled(tmp_path / "faces.csv", DataOptions(group="person"))
    assert data.targets.kind == "class" and data.targets.names == ["cat", "dog"]
    assert [data.splits[i] for i in range(30, 40)] == ["test"] * 10 and "val" in data.splits
    assert data.split_sizes()["train"] + data.split_sizes()["val"] == 30
    for person in range(8):  # carved val keeps a person's train images together
        assert len({data.splits[i] for i in range(person * 4, min(30, person * 4 + 4))}) == 1
    assert data.images.read(0).shape == (10, 12, 3)

    ages = read_labelled(tmp_path / "faces.csv", DataOptions(label="age", regression=True, unit="years", split=""))
    assert ages.targets.kind == "regression" and ages.targets.unit == "years"
    assert ages.targets.values[:3, 0].tolist() == [20.0, 21.0, 22.0]
    assert set(ages.splits) == {"train", "val", "test"}  # split column ignored: hash split
    with pytest.raises(ValueError, match="no column 'id'"):
        read_labelled(tmp_path / "faces.csv", DataOptions(group="id"))


def test_csv_paths_can_name_members_of_a_zip(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "images.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(6):
            archive.writestr(f"crop/{i}.jpg", jpeg(_rgb(i, 16, 16)))
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"crop/{i}.jpg,{i % 2}\n" for i in range(6)))
    data = read_labelled(tmp_path / "labels.csv", DataOptions(images=str(tmp_path / "images.zip")))
    assert len(data) == 6 and data.images.read(5).shape == (16, 16, 3) and data.targets.names == ["0", "1"]
    with pytest.raises(ValueError, match="do not exist.*--images"):
        read_labelled(tmp_path / "labels.csv")


def test_bad_labels_get_clear_errors(tmp_path: Path) -> None:
    """Issue 18 item 10: an empty label cell used to become a class named ''."""
    names = _write_images(tmp_path / "img", 4)
    (tmp_path / "empty.csv").write_text("path,label\n" + "".join(
        f"{n},{'' if i == 2 else 'a'}\n" for i, n in enumerate(names)))
    with pytest.raises(ValueError, match=r"empty label.*row 4 \(img/2.png\)"):
        read_labelled(tmp_path / "empty.csv")
    (tmp_path / "ages.csv").write_text("path,age\n" + "".join(
        f"{n},{'forty' if i == 1 else i}\n" for i, n in enumerate(names)))
    with pytest.raises(ValueError, match=r"not finite numbers.*row 3 \(img/1.png\) \('forty'\)"):
        read_labelled(tmp_path / "ages.csv", DataOptions(label="age", regression=True))
    (tmp_path / "nopath.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(ValueError, match="needs a header with 'path'"):
        read_labelled(tmp_path / "nopath.csv")
    (tmp_path / "missing.csv").write_text("path,label\nimg/0.png,a\nimg/99.png,b\n")
    with pytest.raises(ValueError, match="1 image.*do not exist.*img/99.png"):
        read_labelled(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="folder of class sub-folders, a .csv or an .npz"):
        read_labelled(tmp_path / "img" / "0.png")


def test_npz_reader_uses_class_names_and_split_names(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    labels = np.arange(20) % 3
    np.savez(tmp_path / "set.npz", images=images, labels=labels, class_names=np.array(["z", "y", "x"]),
             split=(np.arange(20) >= 15).astype(np.int8), split_names=np.array(["train", "test"]))
    data = read_labelled(tmp_path / "set.npz")
    assert data.targets.names == ["z", "y", "x"] and data.targets.values.tolist() == labels.tolist()
    assert data.splits[15:] == ["test"] * 5 and "val" in data.splits[:15]
    np.savez(tmp_path / "bad.npz", images=images, labels=np.arange(19))
    with pytest.raises(ValueError, match="one label per image"):
        read_labelled(tmp_path / "bad.npz")


def _set(labels: list[int], splits: list[str]) -> LabelledSet:
    n = len(labels)
    targets = Targets("class", torch.tensor(labels), [f"c{i}" for i in range(max(labels) + 1)])
    return LabelledSet(ArrayImages(np.zeros((n, 4, 4), dtype=np.uint8)), targets, splits, [str(i) for i in range(n)],
                       source="s")


def test_checks_refuse_what_cannot_be_measured_and_warn_about_single_image_classes(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18 item 10: a class with one image gave accuracy 0.0 without a word."""
    with pytest.raises(ValueError, match="test split of the 3 labelled images is empty"):
        check_labelled(_set([0, 1, 0], ["train", "train", "val"]))
    with pytest.raises(ValueError, match="train split holds 1 class"):
        check_labelled(_set([0, 0, 1], ["train", "train", "test"]))
    with caplog.at_level(logging.WARNING):
        warnings = check_labelled(_set([0, 0, 1, 1, 2], ["train", "val", "train", "test", "test"]))
    assert any("single image" in w and "c2" in w for w in warnings)
    assert any("in test but not in train" in w and "c2" in w for w in warnings)
    assert "single image" in caplog.text
    assert check_labelled(_set([0, 0, 1, 1, 0, 1], ["train", "train", "train", "train", "val", "test"])) == []
