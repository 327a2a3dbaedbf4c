"""Labelled sets from files a user has: a class-per-folder tree, a CSV (paths on disk or members of a
zip), or an ``.npz`` of images and labels (the offline ``proxy:NAME`` sets are :mod:`pacofr.eval.proxy`'s;
:func:`pacofr.eval.data_sources.open_data` takes either).

* folder ``root/<class>/<image>``: class labels;
* CSV with a ``path`` column and a label column (``--label``, default ``label``; a column named
  ``labels`` holds ``;``-separated attributes). Paths are relative to the CSV's folder, or to
  ``images`` (a folder, or a ``.zip`` whose members they name);
* ``.npz`` with an image array (``images``, or encoded ``jpeg`` + ``jpeg_offsets``) and a label
  array (``labels`` by default; integer labels name ``class_names`` when it is there).

Labels are classes unless ``regression`` (numbers, e.g. an age). A ``split`` column / array is
honoured when present (see :func:`pacofr.eval.splits.parse_split_names`), with a validation split
carved from train when it names none; otherwise the split is a hash of each image's group
(``group`` column / array) or path. Images are decoded only when features are extracted.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pacofr.data.image_sets import FileImages, ImageSet, ZipImages, load_npz, npz_images, open_image_set
from pacofr.eval.labelled import LabelledSet, Targets, class_targets, multi_targets, regression_targets
from pacofr.eval.splits import SPLIT_FRACTIONS, VAL_FRACTION, carve_validation, hash_splits, parse_split_names


MULTI_LABEL_COLUMN = "labels"
DEFAULT_SPLIT = "split"
_NPZ_LABEL_KEYS = ("labels", "label", "y")
_NPZ_NAME_KEYS = ("filenames", "names", "paths")


@dataclass(frozen=True)
class DataOptions:
    """How to read a user's labelled set (the ``--label``, ``--regression``, ... options).

    ``label``: the CSV column or npz array of the target (default: ``label`` / ``labels`` in a
    CSV, the first of ``labels``, ``label``, ``y`` in an npz); ``regression``: numeric targets
    (metric: mean absolute error in ``unit``); ``split``: the split column / array (default
    ``split`` when present; ``""`` ignores it); ``group``: images sharing its value share a
    split; ``images``: a folder or ``.zip`` holding the CSV's paths.
    """

    label: str | None = None
    regression: bool = False
    unit: str = ""
    split: str | None = None
    group: str | None = None
    images: str | None = None


def assemble(images: ImageSet, targets: Targets, keys: Sequence[str], *, groups: Sequence[str] | None = None,
             given_splits: Sequence[str] | None = None, source: str, protocol: str = "") -> LabelledSet:
    """A :class:`LabelledSet` from images and targets with the split rules of this module: the
    given splits (plus a carved val split) or hash splits of the groups (keys when no groups)."""
    groups = [g if g else k for g, k in zip(groups, keys, strict=True)] if groups is not None else list(keys)
    classes = targets.values.tolist() if targets.kind == "class" else None
    if given_splits is not None:
        splits = carve_validation(given_splits, groups, classes)
        rule = (f"split as given; val carved from train (about {VAL_FRACTION:.0%} of its groups"
                f"{', per class' if classes is not None else ''})" if "val" not in given_splits else "split as given")
    else:
        splits = hash_splits(groups)
        rule = f"hash of each image's {'group' if groups != list(keys) else 'path'}: about {SPLIT_FRACTIONS}"
    return LabelledSet(images, targets, splits, list(groups), source=source, protocol=protocol or rule)


def read_folder(root: Path) -> LabelledSet:
    """Class labels from ``root/<class>/<image>`` (split: hash of the relative path)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {root} has no class sub-folders (expected root/<class>/<image>)")
    images = open_image_set(root)
    labels = [key.split("/", 1)[0] for key in images.keys]
    loose = [key for key in images.keys if "/" not in key]
    if loose:
        raise ValueError(f"data folder {root} has images outside the class sub-folders, e.g. {loose[:3]}")
    return assemble(images, class_targets(labels, images.keys), images.keys, source=str(root))


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read the CSV {path}: {err}") from err
    return fields, rows


def _csv_images(path: Path, relative: list[str], images: str | None) -> ImageSet:
    if images is not None and Path(images).suffix.lower() == ".zip":
        return ZipImages(Path(images).expanduser(), relative)
    base = Path(images).expanduser() if images is not None else path.parent
    files = [base / p for p in relative]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) listed in {path.name} do not exist, e.g. {missing[:3]}"
                         + ("" if images else "; paths are relative to the CSV's folder, or pass the folder or "
                            ".zip that holds them (--images)"))
    return FileImages(files, keys=relative)


def read_csv(path: Path, options: DataOptions) -> LabelledSet:
    """A labelled set from a CSV (see module doc)."""
    fields, rows = _csv_rows(path)
    label = options.label or ("label" if "label" in fields else MULTI_LABEL_COLUMN)
    if "path" not in fields or label not in fields:
        raise ValueError(f"data CSV {path} needs a header with 'path' and the label column {label!r} ('label' for "
                         f"classes, 'labels' for ';'-separated attributes, or name it with --label); got {fields}")
    if not rows:
        raise ValueError(f"data CSV {path} has no rows")
    relative = [row["path"].strip() for row in rows]
    where = [f"row {i + 2} ({p})" for i, p in enumerate(relative)]
    empty_paths = [w for w, p in zip(where, relative, strict=True) if not p]
    if empty_paths:
        raise ValueError(f"data CSV {path}: {len(empty_paths)} row(s) have an empty path, e.g. {empty_paths[:3]}")
    values = [row[label] or "" for row in rows]
    if options.regression:
        targets = regression_targets(values, where, label, options.unit)
    elif label == MULTI_LABEL_COLUMN:
        targets = multi_targets(values)
    else:
        targets = class_targets(values, where)
    split_column = DEFAULT_SPLIT if options.split is None else options.split
    for column in (c for c in (options.split, options.group) if c):
        if column not in fields:
            raise ValueError(f"data CSV {path} has no column {column!r}; columns: {fields}")
    given = parse_split_names([row[split_column] for row in rows], split_column) if split_column in fields else None
    groups = [row[options.group].strip() for row in rows] if options.group else None
    return assemble(_csv_images(path, relative, options.images), targets, relative, groups=groups,
                    given_splits=given, source=str(path))


def _npz_strings(arrays: np.lib.npyio.NpzFile, key: str) -> list[str]:
    return [str(v) for v in arrays[key].tolist()]


def read_npz(path: Path, options: DataOptions) -> LabelledSet:
    """A labelled set from an ``.npz`` (see module doc)."""
    arrays = load_npz(path)
    names = list(arrays.keys())
    label = options.label or next((k for k in _NPZ_LABEL_KEYS if k in names), None)
    if label is None or label not in names:
        raise ValueError(f"{path} has no label array {label or _NPZ_LABEL_KEYS}; it holds {names} (name one with --label)")
    name_key = next((k for k in _NPZ_NAME_KEYS if k in names), None)
    keys = _npz_strings(arrays, name_key) if name_key else None
    images = npz_images(arrays, path, keys=keys)
    raw = arrays[label]
    if raw.ndim != 1 or raw.shape[0] != len(images):
        raise ValueError(f"{path}: {label!r} must hold one label per image ({len(images)}), got shape {raw.shape}")
    where = [f"{label}[{i}]" for i in range(len(images))]
    if options.regression:
        targets = regression_targets(raw.tolist(), where, label, options.unit)
    elif "class_names" in names and np.issubdtype(raw.dtype, np.integer):
        class_names = _npz_strings(arrays, "class_names")
        if raw.size and not (0 <= raw.min() and raw.max() < len(class_names)):
            raise ValueError(f"{path}: integer labels must index class_names (0..{len(class_names) - 1}), "
                             f"got {int(raw.min())}..{int(raw.max())}")
        targets = class_targets([class_names[int(v)] for v in raw], where, class_names)
    else:
        targets = class_targets([str(v) for v in raw.tolist()], where)
    split_key = DEFAULT_SPLIT if options.split is None else options.split
    for key in (k for k in (options.split, options.group) if k):
        if key not in names:
            raise ValueError(f"{path} has no array {key!r}; it holds {names}")
    given = None
    if split_key and split_key in names:
        values = arrays[split_key].tolist()
        if "split_names" in names and np.issubdtype(arrays[split_key].dtype, np.integer):
            split_names = _npz_strings(arrays, "split_names")
            values = [split_names[int(v)] for v in values]
        given = parse_split_names(values, split_key)
    groups = _npz_strings(arrays, options.group) if options.group else None
    return assemble(images, targets, images.keys, groups=groups, given_splits=given, source=str(path))


def read_labelled(source: str | Path, options: DataOptions | None = None) -> LabelledSet:
    """A labelled set from a class-per-folder directory, a CSV or an ``.npz`` (see module doc)."""
    options = options or DataOptions()
    path = Path(source).expanduser()
    if path.is_dir():
        if options.regression or options.label or options.split or options.group or options.images:
            raise ValueError("a class-per-folder directory takes no --label / --regression / --split-column / "
                             "--group-column / --images (use a CSV for those)")
        return read_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{source} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, options)
    if suffix == ".npz":
        if options.images:
            raise ValueError("--images applies to a CSV; an .npz holds its own images")
        return read_npz(path, options)
    raise ValueError(f"data must be a folder of class sub-folders, a .csv or an .npz file, got {source!r}")
