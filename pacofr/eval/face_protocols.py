"""Face tasks with fixed, documented protocols, read from a data root laid out as ``/work/shared/data``.

| task | data (under the root) | target | split |
|---|---|---|---|
| ``fer2013`` | ``fer2013/fer2013.npz`` | expression, 7 classes | its train / test; test images with an exact copy in train (``dup_cross_split``) removed |
| ``utkface-gender`` | ``utkface_crop_part1/labels.csv`` + ``images.zip`` | gender, 2 classes | 80 / 20 by a hash of the file name, duplicate groups on one side |
| ``utkface-age`` | the same | age in years (MAE) | the same |
| ``olivetti`` | ``olivetti/olivetti.npz`` | identity, 40 people | first 5 images of a person train, last 5 test |
| ``yaleb`` | ``extended_yaleb_cropped/extended_yaleb_96x84.npz`` | identity, 38 people | per person, half of the images (by a hash of the file name) train, the rest test |
| ``ytf-landmarks`` | ``ytf_udacity68/ytf_udacity68.npz`` (128 px colour crops) | 68 points (NME, % of the outer-eye-corner distance) | its identity-disjoint ``split`` (not ``split_orig``, which leaks) |

Every task carves its validation split from train (about 15 % of the train groups, per class for
classes; groups are duplicate groups for FER-2013 and UTKFace, identities for the landmarks),
so hyper-parameters are never picked on test. Images are used as the sets store them (already
cropped faces), resized to each row's input size. Tasks on the same images (the two UTKFace
tasks) share one :class:`~pacofr.data.image_sets.ImageSet`, so their features are extracted once.

The registry (:data:`FACE_TASKS`) is import-light (the command line is built from it); the
loaders import what they need when they run.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pacofr.data.image_sets import ImageSet
    from pacofr.eval.labelled import LabelledSet, Targets


UTK_TRAIN_FRACTION = 0.8
UTK_SALT = "pacofr-utkface-v1"
YALEB_SALT = "pacofr-yaleb-v1"
OLIVETTI_TRAIN_PER_PERSON = 5
LANDMARK_IOD_POINTS = (36, 45)
LANDMARK_CROP = 128.0  # ytf_udacity68 landmarks are in 128-px crop coordinates


@dataclass(frozen=True)
class FaceTask:
    """A task with a fixed protocol: ``load(root, cache)`` reads its set from the data root (``cache``
    holds what tasks on the same images share); ``protocol``: the split in a few words."""

    name: str
    title: str
    protocol: str
    load: Callable[[Path, dict[str, object]], LabelledSet]


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the {what} set is expected there (--data-root points at a folder "
                                "laid out as /work/shared/data; see pacofr/eval/face_protocols.py)")
    return path


def _cached(cache: dict[str, object], key: str, build: Callable[[], object]) -> object:
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _strings(arrays: np.lib.npyio.NpzFile, key: str) -> list[str]:
    return [str(v) for v in arrays[key].tolist()]


def _npz_classes(arrays: np.lib.npyio.NpzFile, where: list[str]) -> Targets:
    from pacofr.eval.labelled import class_targets

    names = _strings(arrays, "class_names")
    return class_targets([names[int(v)] for v in arrays["labels"]], where, names)


def load_fer2013(root: Path, cache: dict[str, object]) -> LabelledSet:
    """FER-2013: its train / test split, test copies of train images dropped (see module doc)."""
    from pacofr.data.image_sets import ArrayImages, SubsetImages, load_npz
    from pacofr.eval.readers import assemble
    path = _need(root / "fer2013" / "fer2013.npz", "FER-2013")
    arrays = load_npz(path)
    keys = _strings(arrays, "filenames")
    split_names = _strings(arrays, "split_names")
    splits = [split_names[int(s)] for s in arrays["split"]]
    keep = [i for i, s in enumerate(splits) if not (s == "test" and bool(arrays["dup_cross_split"][i]))]
    subset = SubsetImages(ArrayImages(arrays["images"], keys=keys, name="fer2013"), keep)
    dup = arrays["dup_group"]
    groups = [f"dup{int(dup[i])}" if dup[i] >= 0 else keys[i] for i in keep]
    targets = _npz_classes(arrays, keys).select(keep)
    dropped = len(splits) - len(keep)
    return assemble(subset, targets, [keys[i] for i in keep], groups=groups, given_splits=[splits[i] for i in keep],
                    source="fer2013", protocol=f"FER-2013 train / test as given; {dropped} test images with an exact "
                                               "copy in train removed; val carved from train per class, duplicate "
                                               "groups kept together")


def _utk_rows(root: Path, cache: dict[str, object]) -> tuple[ImageSet, list[dict[str, str]]]:
    folder = root / "utkface_crop_part1"
    labels, archive = _need(folder / "labels.csv", "UTKFace"), _need(folder / "images.zip", "UTKFace")

    def read() -> tuple[ImageSet, list[dict[str, str]]]:
        from pacofr.data.image_sets import ZipImages

        with labels.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return ZipImages(archive, [r["path"] for r in rows]), rows

    return _cached(cache, "utkface", read)  # type: ignore[return-value]


def _utk_split(rows: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """Groups and train / val / test of the UTKFace rows, the same for both tasks (val carved per gender)."""
    from pacofr.eval.splits import carve_validation, hash_unit

    groups = [f"dup{r['dup_group']}" if int(r["dup_group"]) >= 0 else Path(r["path"]).name for r in rows]
    splits = ["train" if hash_unit(g, UTK_SALT) < UTK_TRAIN_FRACTION else "test" for g in groups]
    return groups, carve_validation(splits, groups, [int(r["gender"]) for r in rows])


def _utk(root: Path, cache: dict[str, object], column: str) -> LabelledSet:
    from pacofr.eval.labelled import class_targets, regression_targets
    from pacofr.eval.readers import assemble

    images, rows = _utk_rows(root, cache)
    groups, splits = _utk_split(rows)
    where = [r["path"] for r in rows]
    if column == "gender":
        names = {"0": "male", "1": "female"}
        targets = class_targets([names.get(r["gender"].strip(), r["gender"]) for r in rows], where)
    else:
        targets = regression_targets([r["age"] for r in rows], where, "age", unit="years")
    return assemble(images, targets, where, groups=groups, given_splits=splits, source=f"utkface-{column}",
                    protocol=f"UTKFace crop_part1: {UTK_TRAIN_FRACTION:.0%} / {1 - UTK_TRAIN_FRACTION:.0%} by a hash "
                             "of the file name (duplicate groups by their group id, kept on one side); val carved "
                             "from train per gender, the same for gender and age")


def load_utkface_gender(root: Path, cache: dict[str, object]) -> LabelledSet:
    """UTKFace gender (0 = male, 1 = female)."""
    return _utk(root, cache, "gender")


def load_utkface_age(root: Path, cache: dict[str, object]) -> LabelledSet:
    """UTKFace age in years, a regression target."""
    return _utk(root, cache, "age")


def load_olivetti(root: Path, cache: dict[str, object]) -> LabelledSet:
    """Olivetti: the first 5 images of each person train, the last 5 test."""
    from pacofr.data.image_sets import load_npz

    path = _need(root / "olivetti" / "olivetti.npz", "Olivetti")
    arrays = load_npz(path)
    labels = arrays["labels"]
    keys = [f"olivetti/{int(label)}/{i}" for i, label in enumerate(labels)]
    seen: dict[int, int] = {}
    splits = []
    for label in labels.tolist():
        seen[label] = seen.get(label, 0) + 1
        splits.append("train" if seen[label] <= OLIVETTI_TRAIN_PER_PERSON else "test")
    return _identity_set(arrays, keys, splits, "olivetti",
                         "Olivetti: first 5 images of each of the 40 people train, last 5 test; val = one train "
                         "image per person (by hash)")


def load_yaleb(root: Path, cache: dict[str, object]) -> LabelledSet:
    """Extended Yale B (cropped): per person, the first half of the images by a hash of the file name train."""
    from pacofr.data.image_sets import load_npz
    from pacofr.eval.splits import hash_unit

    path = _need(root / "extended_yaleb_cropped" / "extended_yaleb_96x84.npz", "Extended Yale B")
    arrays = load_npz(path)
    keys = _strings(arrays, "filenames")
    labels = arrays["labels"].tolist()
    splits = ["test"] * len(keys)
    for person in sorted(set(labels)):
        members = sorted((i for i, label in enumerate(labels) if label == person),
                         key=lambda i: (hash_unit(keys[i], YALEB_SALT), keys[i]))
        for i in members[:(len(members) + 1) // 2]:
            splits[i] = "train"
    return _identity_set(arrays, keys, splits, "yaleb",
                         "Extended Yale B cropped: per person, ceil(n/2) images (by a hash of the file name) train, "
                         "the rest test; val carved from train per person")


def _identity_set(arrays: np.lib.npyio.NpzFile, keys: list[str], splits: list[str], name: str,
                  protocol: str) -> LabelledSet:
    """An identity task from an npz of images, labels and class names, split as given (val carved)."""
    from pacofr.data.image_sets import ArrayImages
    from pacofr.eval.readers import assemble

    return assemble(ArrayImages(arrays["images"], keys=keys, name=name), _npz_classes(arrays, keys), keys,
                    given_splits=splits, source=name, protocol=protocol)


def load_ytf_landmarks(root: Path, cache: dict[str, object]) -> LabelledSet:
    """ytf_udacity68: 68 points on the 128 px colour crops, the identity-disjoint ``split``."""
    import torch

    from pacofr.data.image_sets import EncodedImages, load_npz
    from pacofr.eval.labelled import Targets
    from pacofr.eval.readers import assemble

    path = _need(root / "ytf_udacity68" / "ytf_udacity68.npz", "ytf_udacity68")
    arrays = load_npz(path)
    keys = _strings(arrays, "names")
    images = EncodedImages(arrays["jpeg"], arrays["jpeg_offsets"], keys=keys, name="ytf_udacity68")
    points = torch.from_numpy(np.asarray(arrays["landmarks"], dtype=np.float32) / LANDMARK_CROP)
    targets = Targets("landmarks", points, [], "", LANDMARK_IOD_POINTS)
    identities = _strings(arrays, "identity")
    splits = ["train" if int(s) == 0 else "test" for s in arrays["split"]]
    return assemble(images, targets, keys, groups=identities, given_splits=splits, source="ytf-landmarks",
                    protocol="ytf_udacity68 identity-disjoint `split` (not split_orig, which leaks identities); "
                             "val carved from train by identity; NME in % of the distance of points 36 and 45")


FACE_TASKS: dict[str, FaceTask] = {task.name: task for task in (
    FaceTask("fer2013", "FER-2013 expression",
             "its train/test split, test images with an exact copy in train removed", load_fer2013),
    FaceTask("utkface-gender", "UTKFace gender", "80/20 by a hash of the file name, duplicate groups on one side",
             load_utkface_gender),
    FaceTask("utkface-age", "UTKFace age (MAE, years)", "the same split as UTKFace gender", load_utkface_age),
    FaceTask("olivetti", "Olivetti identity", "first 5 images per person train, last 5 test",
             load_olivetti),
    FaceTask("yaleb", "Extended Yale B identity", "a fixed 50/50 split per person", load_yaleb),
    FaceTask("ytf-landmarks", "68-point landmarks (NME, %)",
             "ytf_udacity68's identity-disjoint split (not split_orig, which leaks)", load_ytf_landmarks),
)}


def face_task(name: str) -> FaceTask:
    """The task called ``name`` (ValueError listing the known ones otherwise)."""
    if name not in FACE_TASKS:
        raise ValueError(f"unknown face task {name!r}; known: {sorted(FACE_TASKS)}")
    return FACE_TASKS[name]


def parse_task_list(text: str) -> list[str]:
    """Task names from ``all`` or a comma-separated list (ValueError naming unknown ones)."""
    names = list(FACE_TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in FACE_TASKS]
    if unknown or not names:
        raise ValueError(f"tasks must be 'all' or a comma-separated list of {list(FACE_TASKS)}, got {text!r}")
    return names


def load_tasks(names: list[str], root: str | Path) -> list[tuple[str, LabelledSet]]:
    """The labelled sets of the tasks ``names`` under ``root`` (tasks on the same images share them)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a folder")
    cache: dict[str, object] = {}
    return [(name, face_task(name).load(root, cache)) for name in names]
