"""Fuzz suite for what users hand in: index records, recipe values, archive members, image arrays and
config values
(hypothesis, derandomised, a few dozen examples each so the file stays well under a minute).

Every input either works or is refused with a ValueError (the CLI's one ``error: ...`` line)
naming where it came from (file and line, or key); never another exception, a hang or a read
outside the prepared folder. What counts as valid is written out here, independently of the code
under test (:func:`_valid_record`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacofr.data.datasets import AlignedFaceDataset
from pacofr.data.demo import demo_root
from pacofr.data.image_io import UnreadableImageError
from pacofr.data.image_sets import ZipImages, open_image_set
from pacofr.data.storage import INDEX_NAME, RECIPE_NAME, read_index
from pacofr.train.config import load_config
from pacofr.train.fields import ConfigError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CROP = 224  # the demo set's recipe size
FACES = 3  # records kept from the demo set


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder: the first demo faces, their crops, the recipe."""
    root = tmp_path_factory.mktemp("prepared")
    source = demo_root()
    lines = (source / INDEX_NAME).read_text().splitlines()[:FACES]
    for line in lines:
        file = json.loads(line)["file"]
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / file, root / file)
    shutil.copyfile(source / RECIPE_NAME, root / RECIPE_NAME)
    (root / INDEX_NAME).write_text("\n".join(lines) + "\n")
    return root


def _records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / INDEX_NAME).read_text().splitlines()]


def _with_record(root: Path, target: Path, line: int, record: dict[str, Any]) -> Path:
    """A copy of ``root`` at ``target`` whose index line ``line`` (1-based) is ``record``."""
    shutil.copytree(root, target, dirs_exist_ok=True)
    records = _records(root)
    records[line - 1] = record
    (target / INDEX_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read would block forever)."""
    def alarm(*_: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BAD_RECORDS = [
    ("landmarks", lambda r: {k: v for k, v in r.items() if k != "landmarks"}),
    ("landmarks", lambda r: {**r, "landmarks": [[1, 2]] * 4}),
    ("landmarks", lambda r: {**r, "landmarks": [[float("nan"), 1.0]] + r["landmarks"][1:]}),
    ("landmarks", lambda r: {**r, "landmarks": [[1e308, 1.0]] + r["landmarks"][1:]}),
    ("landmarks", lambda r: {**r, "landmarks": [["a", 1.0]] + r["landmarks"][1:]}),
    ("landmarks", lambda r: {**r, "landmarks": [[True, 1.0]] + r["landmarks"][1:]}),
    ("neither 'file' nor 'shard'", lambda r: {k: v for k, v in r.items() if k != "file"}),
    ("'file'", lambda r: {**r, "file": 123}),
    ("'file'", lambda r: {**r, "file": None}),
    ("'file'", lambda r: {**r, "file": ""}),
    ("'file' must stay inside", lambda r: {**r, "file": "../x.jpg"}),
    ("'file' must stay inside", lambda r: {**r, "file": "images/../../x.jpg"}),
    ("'file' must stay inside", lambda r: {**r, "file": "/dev/zero"}),
    ("a folder holds files or shards", lambda r: {**{k: v for k, v in r.items() if k != "file"},
                                                  "shard": "s.tar", "offset": 0, "size": 10}),
]


@pytest.mark.parametrize("key, damage", BAD_RECORDS, ids=[f"{i}-{k[:20]}" for i, (k, _) in enumerate(BAD_RECORDS)])
def test_a_bad_index_record_is_refused_naming_its_line_and_key(prepared: Path, tmp_path: Path, key: str,
                                                               damage: Any) -> None:
    root = _with_record(prepared, tmp_path / "edited", 2, damage(_records(prepared)[1]))
    with pytest.raises(ValueError) as info:
        AlignedFaceDataset(root)
    message = str(info.value)
    assert f"{root / INDEX_NAME}: line 2" in message and key in message, message
    assert "\n" not in message


@pytest.mark.parametrize("make", ["fifo", "dev-zero-link", "folder"])
def test_a_file_that_is_not_regular_is_skipped_never_read(prepared: Path, tmp_path: Path, make: str) -> None:
    root = tmp_path / "edited"
    shutil.copytree(prepared, root)
    target = root / "images" / "special.jpg"
    if make == "fifo":
        os.mkfifo(target)
    elif make == "dev-zero-link":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    records = _records(prepared)
    records[0]["file"] = "images/special.jpg"
    (root / INDEX_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = AlignedFaceDataset(root, image_size=64)
    with _deadline(30):
        item = dataset[0]  # skipped: the next face comes instead
    assert item["index"] == 1 and dataset.skipped == 1


def _valid_record(record: dict[str, Any]) -> bool:
    """The rule, written out: five finite [x, y] number pairs within one crop side of the crop,
    and a non-empty relative ``file`` string that does not leave the folder."""
    points = record.get("landmarks")
    if not isinstance(points, list) or len(points) != 5:
        return False
    for point in points:
        if not isinstance(point, list) or len(point) != 2:
            return False
        for v in point:
            if type(v) not in (int, float) or not math.isfinite(v) or not -CROP <= v <= 2 * CROP:
                return False
    file = record.get("file")
    if type(file) is not str or not file or file != file.strip() or "\\" in file:
        return False
    return not PurePosixPath(file).is_absolute() and ".." not in PurePosixPath(file).parts


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=6), max_leaves=14)
COORD = st.one_of(st.floats(-3 * CROP, 3 * CROP), st.sampled_from([float("nan"), float("inf"), 1e308, -1e308]),
                  st.integers(-3 * CROP, 3 * CROP))
LANDMARKS = st.one_of(st.lists(st.lists(COORD, min_size=2, max_size=2), min_size=5, max_size=5), JSON_VALUES)
FILES = st.one_of(st.sampled_from(["images/a.jpg", "../a.jpg", "/etc/passwd", "a/../../b", "./a.jpg", " a.jpg",
                                   "a\\..\\b", "images/./x.jpg", ".."]),
                  st.text(alphabet="ab./\\ ", min_size=0, max_size=8), JSON_VALUES)


@FUZZ
@given(landmarks=LANDMARKS, file=FILES, drop=st.sampled_from([None, "landmarks", "file"]))
def test_any_index_record_is_accepted_exactly_when_valid_or_refused_naming_its_line(
        prepared: Path, tmp_path_factory: pytest.TempPathFactory, landmarks: Any, file: Any, drop: str | None) -> None:
    record = {**_records(prepared)[2], "landmarks": landmarks, "file": file}
    if drop is not None:
        record.pop(drop)
    root = _with_record(prepared, tmp_path_factory.mktemp("fuzz"), 3, record)
    try:
        records = read_index(root)
    except ValueError as err:
        assert not _valid_record(record), f"refused a valid record: {err}"
        assert f"{root / INDEX_NAME}: line 3: " in str(err) and "\n" not in str(err)
        return
    assert _valid_record(record), f"accepted an invalid record {record!r}"
    assert len(records) == FACES


RECIPE_VALUES = st.one_of(st.sampled_from(["big", "", None, True, [], {}, -1, 0, 7, 2**40, float("nan"), 1e308,
                                           224, 1.4, "constant"]), JSON_VALUES)


@FUZZ
@given(key=st.sampled_from(["size", "scale", "border", "detector", "template", "reference"]), value=RECIPE_VALUES)
def test_any_recipe_value_loads_or_is_refused_naming_the_file(prepared: Path,
                                                               tmp_path_factory: pytest.TempPathFactory,
                                                               key: str, value: Any) -> None:
    root = tmp_path_factory.mktemp("recipe")
    shutil.copytree(prepared, root, dirs_exist_ok=True)
    recipe = json.loads((prepared / RECIPE_NAME).read_text())
    recipe[key] = value
    (root / RECIPE_NAME).write_text(json.dumps(recipe))
    try:
        dataset = AlignedFaceDataset(root, image_size=64)
    except ValueError as err:
        assert str(root) in str(err) and "\n" not in str(err), str(err)
        return
    assert dataset.recipe.size == recipe["size"]


CONFIG_KEYS = ["model.mlp_ratio", "model.drop_path_rate", "model.num_regions", "model.timm_name", "model.img_size",
               "model.embed_dim", "model.codebook_size", "model.dead_code_warmup", "model.r_mask", "model.depth",
               "train.epochs", "train.warmup_epochs", "train.batch_size", "train.betas", "data.num_workers",
               "train.epoch", "model.r_mak"]
CONFIG_VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(repr),
                          st.sampled_from(["", "nan", "-inf", "1e23", "[1, 2]", "null", "true", "{a: 1}", "x"]),
                          st.text(max_size=10))


@FUZZ
@given(key=st.sampled_from(CONFIG_KEYS), value=CONFIG_VALUES)
def test_any_config_value_gives_a_config_or_one_config_error_naming_the_key(key: str, value: str) -> None:
    try:
        cfg = load_config("demo", ["model.preset=tiny", f"{key}={value}"])
    except ConfigError as err:
        assert key in str(err) and "\n" not in str(err), str(err)
        return
    assert cfg.model.parameter_lower_bound() <= 2**32 and cfg.model.num_patches <= 2**14


@FUZZ
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4), cap=st.integers(1, 2500))
def test_a_zip_member_is_read_only_up_to_the_byte_cap(tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
                                                      cap: int) -> None:
    archive = tmp_path_factory.mktemp("zip") / "faces.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for number, size in enumerate(sizes):
            handle.writestr(f"m{number}.png", b"\0" * size)  # deflates to a few bytes: a small zip bomb
    images = ZipImages(archive, [f"m{number}.png" for number in range(len(sizes))], max_bytes=cap)
    for number, size in enumerate(sizes):
        if size > cap:
            with pytest.raises(UnreadableImageError, match=f"more than max_bytes={cap}"):
                images._encoded(number)
        else:
            assert images._encoded(number) == b"\0" * size


@pytest.mark.parametrize("array, expected", [
    (np.full((3, 8, 8), np.nan, dtype=np.float32), "3 of 3 images hold NaN or inf"),
    (np.concatenate([np.zeros((2, 8, 8, 3)), np.full((1, 8, 8, 3), np.inf)]), "1 of 3 images hold NaN or inf"),
    (np.zeros((3, 0, 8), dtype=np.uint8), "at least 1 x 1 pixels, got height 0"),
    (np.zeros((3, 8, 0, 3), dtype=np.uint8), "width 0"),
])
def test_npz_images_that_are_not_finite_or_empty_are_refused_naming_the_file(tmp_path: Path, array: np.ndarray,
                                                                           expected: str) -> None:
    path = tmp_path / "faces.npz"
    np.savez(path, images=array)
    with pytest.raises(ValueError, match=expected) as info:
        open_image_set(path)
    assert "faces.npz:images" in str(info.value)
