"""Train / val / test splits that do not depend on file order, and the validation split carved from train.

* :func:`hash_splits`: about 70 / 15 / 15 % by a salted hash of each image's *group* key (its
  path when it has no group), so adding or removing other images never moves an image, and all
  images of a group (a person, a set of duplicates) land on one side;
* :func:`parse_split_names`: a split column as given by a data set (``train`` / ``val`` /
  ``test`` and common synonyms, or the codes 0 = train, 1 = test, 2 = val);
* :func:`carve_validation`: when a set names only train and test, a validation split is carved
  from train (about 15 % of its groups, per class for class labels), so hyper-parameters are
  picked on it and never on test.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_SALT = "pacofr-split-v1"
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
VAL_SALT = "pacofr-val-v1"
VAL_FRACTION = 0.15
_SYNONYMS = {"train": "train", "training": "train", "trn": "train",
             "val": "val", "valid": "val", "validation": "val", "dev": "val",
             "test": "test", "testing": "test", "tst": "test"}
_CODES = {0: "train", 1: "test", 2: "val"}


def hash_unit(key: str, salt: str = SPLIT_SALT) -> float:
    """A number in [0, 1) fixed by ``sha1(salt + ":" + key)``."""
    digest = hashlib.sha1(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, salt: str = SPLIT_SALT) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a key (an image's relative path or its group)."""
    u = hash_unit(key, salt)
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"] else "test"


def hash_splits(groups: Sequence[str]) -> list[str]:
    """The split of every image from its group key (see :func:`split_of`)."""
    return [split_of(g) for g in groups]


def parse_split_names(values: Sequence[object], column: str) -> list[str]:
    """Split names from a split column: ``train``/``val``/``test`` (case-insensitive; also
    training, valid, validation, dev, testing) or the integer codes 0 = train, 1 = test, 2 = val.

    Raises ValueError naming ``column`` and the values it cannot read.
    """
    out: list[str] = []
    bad: list[str] = []
    codes_used = False
    for value in values:
        text = str(value).strip().lower()
        if text in _SYNONYMS:
            out.append(_SYNONYMS[text])
            continue
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if number.is_integer() and int(number) in _CODES:
            out.append(_CODES[int(number)])
            codes_used = True
        else:
            out.append("")
            bad.append(str(value))
    if bad:
        raise ValueError(f"split column {column!r}: cannot read {sorted(set(bad))[:5]} as a split; expected "
                         "train / val / test (or 0 = train, 1 = test, 2 = val)")
    if codes_used:
        logger.info("split column %r holds codes: read as 0 = train, 1 = test, 2 = val", column)
    return out


def carve_validation(splits: Sequence[str], groups: Sequence[str], classes: Sequence[int] | None = None,
                     fraction: float = VAL_FRACTION) -> list[str]:
    """Move about ``fraction`` of the train groups to ``"val"`` (a copy of ``splits`` is returned).

    Groups are ranked by a salted hash of their key; with ``classes`` (one class index per image)
    the carving is done per class (by the class of a group's first image), taking at least one
    group of every class that has two or more train groups. Sets that already have a val split
    are returned unchanged.
    """
    splits = list(splits)
    if "val" in splits:
        return splits
    if len(groups) != len(splits) or (classes is not None and len(classes) != len(splits)):
        raise ValueError("carve_validation needs one group (and class) per image")
    first_class: dict[str, int] = {}
    for index, (split, group) in enumerate(zip(splits, groups, strict=True)):
        if split == "train" and group not in first_class:
            first_class[group] = int(classes[index]) if classes is not None else 0
    by_class: dict[int, list[str]] = {}
    for group, cls in first_class.items():
        by_class.setdefault(cls, []).append(group)
    val_groups: set[str] = set()
    for members in by_class.values():
        ranked = sorted(members, key=lambda g: (hash_unit(g, VAL_SALT), g))
        count = round(fraction * len(ranked))
        if classes is not None and len(ranked) >= 2:
            count = max(1, count)
        val_groups.update(ranked[:count])
    return ["val" if s == "train" and g in val_groups else s for s, g in zip(splits, groups, strict=True)]
