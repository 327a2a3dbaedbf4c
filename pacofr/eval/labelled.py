"""Labelled image sets for evaluation: images, targets of one kind, and a train / val / test split.

A :class:`LabelledSet` couples an :class:`pacofr.data.image_sets.ImageSet` (decoded lazily, one
batch at a time) with :class:`Targets`:

* ``class``: one class per image, int64 (N,) indices into ``names`` (accuracy, %);
* ``multi``: attributes, float32 (N, C) multi-hot (mean per-attribute accuracy, %);
* ``regression``: float32 (N, T) numbers in the label's unit (mean absolute error);
* ``landmarks``: float32 (N, P, 2) points as fractions of the image side, x then y (NME in % of
  the distance between points ``iod_points``).

:mod:`pacofr.eval.readers` builds them from folders, CSV files, zips and npz files;
:mod:`pacofr.eval.face_protocols` from the face sets with fixed protocols.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pacofr.data.image_sets import ImageSet
from pacofr.eval.splits import SPLITS

logger = logging.getLogger(__name__)

TargetKind = Literal["class", "multi", "regression", "landmarks"]
TARGET_KINDS: tuple[str, ...] = ("class", "multi", "regression", "landmarks")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Targets:
    """What is predicted for every image (see module doc for ``kind`` and ``values``).

    ``names``: class or attribute names (class, multi), target names (regression) or ``[]``;
    ``unit``: the unit of regression values (``"years"``); ``iod_points``: landmarks only, the two
    points whose distance normalises the error (300-W: outer eye corners 36 and 45).
    """

    kind: TargetKind
    values: torch.Tensor
    names: list[str] = field(default_factory=list)
    unit: str = ""
    iod_points: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        v = self.values
        expected = {"class": (1, torch.int64), "multi": (2, torch.float32), "regression": (2, torch.float32),
                    "landmarks": (3, torch.float32)}[self.kind]
        if v.ndim != expected[0] or v.dtype != expected[1]:
            raise ValueError(f"{self.kind} targets must be {expected[1]} with {expected[0]} dims, got {v.dtype} "
                             f"{tuple(v.shape)}")
        if self.kind == "multi" and v.shape[1] != len(self.names):
            raise ValueError(f"{v.shape[1]} attribute columns for {len(self.names)} names")
        if self.kind == "class" and v.numel() and not (0 <= int(v.min()) and int(v.max()) < len(self.names)):
            raise ValueError(f"class indices must lie in [0, {len(self.names)}), got [{int(v.min())}, {int(v.max())}]")
        if self.kind in ("regression", "landmarks") and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{self.kind} targets must be finite numbers")
        if self.kind == "landmarks":
            if v.shape[-1] != 2:
                raise ValueError(f"landmarks must be (N, P, 2), got {tuple(v.shape)}")
            if self.iod_points is None or not all(0 <= p < v.shape[1] for p in self.iod_points):
                raise ValueError(f"landmarks need iod_points (two point indices < {v.shape[1]}), got {self.iod_points}")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def width(self) -> int:
        """Outputs a head predicts: classes, attributes, regression targets or 2 x points."""
        if self.kind == "class":
            return len(self.names)
        return math.prod(self.values.shape[1:])

    def select(self, indices: Sequence[int]) -> Targets:
        """The targets of the images ``indices``."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return Targets(self.kind, self.values[index], list(self.names), self.unit, self.iod_points)


def sort_class_names(names: set[str] | Sequence[str]) -> list[str]:
    """Class names in order: numerically when every name is a number (``2`` before ``10``),
    otherwise as strings."""
    names = sorted(set(names))
    if names and all(_NUMBER.match(n) for n in names):
        return sorted(names, key=lambda n: (float(n), n))
    return names


def class_targets(labels: Sequence[str], where: Sequence[str], names: Sequence[str] | None = None) -> Targets:
    """Class targets from label strings; ``where[i]`` names row i in errors (empty labels are refused).
    ``names``: the classes in their order (default: :func:`sort_class_names` of the labels)."""
    cleaned = [str(label).strip() for label in labels]
    empty = [where[i] for i, label in enumerate(cleaned) if not label]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have an empty label, e.g. {empty[:3]}: give every image a "
                         "class (or drop those rows)")
    names = list(names) if names is not None else sort_class_names(cleaned)
    index = {name: i for i, name in enumerate(names)}
    return Targets("class", torch.tensor([index[label] for label in cleaned], dtype=torch.int64), names)


def multi_targets(labels: Sequence[str], separator: str = ";") -> Targets:
    """Multi-label targets from ``separator``-joined attribute strings (an empty cell: no attribute)."""
    sets = [sorted({t.strip() for t in str(label).split(separator) if t.strip()}) for label in labels]
    names = sort_class_names({n for names in sets for n in names})
    index = {name: i for i, name in enumerate(names)}
    values = torch.zeros(len(sets), len(names), dtype=torch.float32)
    for row, members in enumerate(sets):
        values[row, [index[n] for n in members]] = 1.0
    return Targets("multi", values, names)


def regression_targets(labels: Sequence[Any], where: Sequence[str], name: str, unit: str = "") -> Targets:
    """One numeric target per image; empty, unparsable and non-finite values are refused, naming rows."""
    values: list[float] = []
    bad: list[str] = []
    for i, label in enumerate(labels):
        try:
            value = float(str(label).strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            bad.append(f"{where[i]} ({str(label).strip()!r})")
        values.append(value)
    if bad:
        raise ValueError(f"{len(bad)} label(s) of {name!r} are not finite numbers, e.g. {bad[:3]}: a regression "
                         "target needs a number for every image")
    return Targets("regression", torch.tensor(values, dtype=torch.float32)[:, None], [name], unit)


@dataclass
class LabelledSet:
    """Images with targets and a split.

    ``groups``: one key per image; images of a group share a split (hash splits and the carved
    validation split). ``splits``: ``"train"``, ``"val"`` or ``"test"`` per image. ``protocol``:
    how the split was made, in words (written with the results).
    """

    images: ImageSet
    targets: Targets
    splits: list[str]
    groups: list[str]
    source: str = ""
    protocol: str = ""

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.targets) == len(self.splits) == len(self.groups) == n):
            raise ValueError(f"a labelled set needs one target, split and group per image: {n} images, "
                             f"{len(self.targets)} targets, {len(self.splits)} splits, {len(self.groups)} groups")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split names {unknown}; expected {SPLITS}")

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, split: str) -> list[int]:
        """Positions of the images in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [i for i, s in enumerate(self.splits) if s == split]

    def split_sizes(self) -> dict[str, int]:
        """Images per split."""
        return {s: self.splits.count(s) for s in SPLITS}


def check_labelled(data: LabelledSet) -> list[str]:
    """Raise ValueError when ``data`` cannot give honest numbers; return warnings (also logged).

    Errors: fewer than two classes; an empty train or test split; fewer than two classes in train.
    Warnings: an empty val split (hyper-parameters then fall back to their first grid value),
    classes with a single image, classes in test that train never shows (always wrong).
    """
    sizes = data.split_sizes()
    if data.targets.kind == "class" and len(set(data.targets.values.tolist())) < 2:
        raise ValueError(f"the labelled set has {len(set(data.targets.values.tolist()))} class(es) "
                         f"{data.targets.names[:10]}; a classifier needs at least 2")
    for split in ("train", "test"):
        if not sizes[split]:
            raise ValueError(f"the {split} split of the {len(data)} labelled images is empty ({sizes}); use more "
                             "images or give a split column")
    warnings: list[str] = []
    if not sizes["val"]:
        warnings.append("the val split is empty: hyper-parameters cannot be picked and take their first grid value")
    targets = data.targets
    if targets.kind == "class":
        names = targets.names
        counts = torch.bincount(targets.values, minlength=len(names))
        train = torch.bincount(targets.values[data.indices("train")], minlength=len(names))
        test = torch.bincount(targets.values[data.indices("test")], minlength=len(names))
        if int((train > 0).sum()) < 2:
            raise ValueError(f"the train split holds {int((train > 0).sum())} class(es) of {names[:10]}: a classifier "
                             "needs at least 2")
        single = [names[i] for i in range(len(names)) if counts[i] == 1]
        if single:
            warnings.append(f"{len(single)} class(es) have a single image, e.g. {single[:5]}: such a class is in one "
                            "split only and cannot be both learnt and tested")
        unseen = [names[i] for i in range(len(names)) if test[i] > 0 and train[i] == 0]
        if unseen:
            warnings.append(f"{len(unseen)} class(es) are in test but not in train, e.g. {unseen[:5]} "
                            f"({int(test[[names.index(n) for n in unseen]].sum())} test images that no head can get right)")
    for text in warnings:
        logger.warning("%s: %s", data.source or "labelled set", text)
    return warnings


def describe_data(data: LabelledSet) -> dict[str, Any]:
    """JSON-friendly description of a labelled set, its targets and its split."""
    out: dict[str, Any] = {"source": data.source, "num_images": len(data), "target": data.targets.kind,
                           "names": list(data.targets.names)[:100], "split_sizes": data.split_sizes(),
                           "protocol": data.protocol}
    if data.targets.kind == "class":
        out["per_class"] = {
            split: dict(zip(data.targets.names,
                            torch.bincount(data.targets.values[data.indices(split)],
                                           minlength=len(data.targets.names)).tolist(), strict=True))
            for split in SPLITS}
    if data.targets.unit:
        out["unit"] = data.targets.unit
    return out
