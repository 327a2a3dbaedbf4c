"""Labelled face sets for evaluation, with a fixed split that does not depend on file order.

Two layouts are read:

* a folder with one sub-folder per class (``root/<class>/<image>``): single-label;
* a CSV file ``path,label`` (one label per row: single-label) or ``path,labels`` with labels
  separated by ``;`` (multi-label attributes). Paths are relative to the CSV's folder.

The split of an image is decided by a hash of its relative path (salted, see :data:`SPLIT_SALT`),
so adding or removing other images never moves it: about 70 % train, 15 % val, 15 % test.
Identities may appear in more than one split (a closed-set probe); the test split is used only
for the final-epoch numbers.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_SALT = "pacofr-split-v1"
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def split_of(key: str, salt: str = SPLIT_SALT) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for an image's relative path (stable hash)."""
    digest = hashlib.sha1(f"{salt}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"] else "test"


@dataclass
class LabelledSet:
    """Image paths with labels.

    ``labels`` is int64 (N,) class indices for single-label sets, float32 (N, C) multi-hot for
    multi-label sets; ``keys`` are the paths relative to the set's root (they decide the split).
    """

    paths: list[Path]
    keys: list[str]
    labels: torch.Tensor
    class_names: list[str]
    multi_label: bool = False
    splits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.splits:
            self.splits = [split_of(k) for k in self.keys]

    def indices(self, split: str) -> list[int]:
        """Positions of the images in ``split``."""
        if split not in SPLIT_FRACTIONS:
            raise ValueError(f"split must be one of {tuple(SPLIT_FRACTIONS)}, got {split!r}")
        return [i for i, s in enumerate(self.splits) if s == split]


def _from_folder(root: Path) -> LabelledSet:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data folder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, keys, labels = [], [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                keys.append(path.relative_to(root).as_posix())
                labels.append(label)
    if not paths:
        raise ValueError(f"data folder {root} holds no images with suffixes {IMAGE_SUFFIXES}")
    return LabelledSet(paths, keys, torch.tensor(labels, dtype=torch.int64), classes)


def _from_csv(path: Path) -> LabelledSet:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "path" not in fields or not ({"label", "labels"} & set(fields)):
            raise ValueError(f"data CSV {path} needs a header with 'path' and 'label' (single-label) "
                             f"or 'labels' (multi-label, ';'-separated); got {fields}")
        multi = "labels" in fields
        rows = [(r["path"], r["labels" if multi else "label"]) for r in reader]
    if not rows:
        raise ValueError(f"data CSV {path} has no rows")
    raw = [sorted({t.strip() for t in labels.split(";") if t.strip()}) if multi else [labels.strip()]
           for _, labels in rows]
    classes = sorted({name for names in raw for name in names})
    index = {name: i for i, name in enumerate(classes)}
    paths = [(path.parent / p).resolve() for p, _ in rows]
    keys = [p for p, _ in rows]
    if multi:
        labels = torch.zeros(len(rows), len(classes), dtype=torch.float32)
        for i, names in enumerate(raw):
            labels[i, [index[n] for n in names]] = 1.0
    else:
        labels = torch.tensor([index[names[0]] for names in raw], dtype=torch.int64)
    return LabelledSet(paths, keys, labels, classes, multi_label=multi)


def load_labelled(source: str | Path) -> LabelledSet:
    """Read a labelled set from a class-per-folder directory or a CSV file (see module doc)."""
    path = Path(source)
    if path.is_dir():
        return _from_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    raise ValueError(f"data must be a folder of class sub-folders or a .csv file, got {source!r}")
