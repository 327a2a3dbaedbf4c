"""On-disk layout of a prepared face set and crash-safe writing.

A folder written by ``pacofr prepare`` holds:

* ``recipe.json``: the ``AlignmentRecipe`` (``to_dict``) used for every crop;
* ``summary.json``: format, settings and counts of the run;
* ``index.jsonl``: one JSON object per aligned face, sorted by source path then face number:
  ``source``, ``face``, ``landmarks`` (5 x [x, y] in the aligned crop), optionally
  ``landmarks_dense``, ``box`` and ``score`` (in the source photo) and where the pixels are:
  ``file`` (format "files", relative to the folder) or ``shard``, ``offset``, ``size``
  (format "shards": the JPEG's byte range inside ``shards/<shard>``, an uncompressed tar);
* ``images/`` (format "files") or ``shards/`` (format "shards");
* ``.pacofr-prepare/``: the resumable run's journal and scratch space.

Every final file is written to a temporary name and renamed into place, so a crash never
leaves a half-written index, recipe or shard.

A folder is read back checked (:func:`read_index`, :func:`read_recipe_dict`), since both files
may have been edited by hand: every index record must say where its pixels are (a relative
``file`` inside the folder, or a plain ``shard`` name with integer ``offset`` and ``size``, the
same kind on every line) and hold five finite ``landmarks`` within one crop side of the crop;
the recipe's values must have their types. A record or value that does not is refused in one
line naming the file, the line and the key. The pixels themselves are read only from regular
files (``pacofr.data.image_io.read_regular_file``, :func:`open_shard`).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pacofr.data.alignment import AlignmentRecipe
from pacofr.data.image_io import DEFAULT_MAX_BYTES

INDEX_NAME = "index.jsonl"
RECIPE_NAME = "recipe.json"
SUMMARY_NAME = "summary.json"
IMAGES_DIR = "images"
SHARDS_DIR = "shards"
WORK_DIR = ".pacofr-prepare"


def write_atomic(path: str | os.PathLike, data: bytes, *, scratch: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in ``scratch`` (default: beside ``path``,
    same file system) and an atomic rename."""
    target = Path(path)
    folder = Path(scratch) if scratch is not None else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".tmp-{os.getpid()}-{target.name}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def give_default_mode(path: str | os.PathLike) -> None:
    """Set ``path``'s permissions to those of a newly created file under the process umask
    (0644 under the usual 022): for files written by libraries that create them 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def dumps_line(record: dict[str, Any]) -> str:
    """One JSON-lines line (sorted keys, compact, no NaN) with its newline."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines, atomically; returns how many were written."""
    lines = [dumps_line(record) for record in records]
    write_atomic(path, "".join(lines).encode("utf-8"))
    return len(lines)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Write one JSON document (indented, sorted keys), atomically."""
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file.

    Args:
        tolerate_torn_tail: ignore an unparsable *last* line (a write cut short by a crash);
            any other bad line is an error.
    Raises:
        ValueError: a line that is not a JSON object (naming the file and line number).
    """
    for _, record in _numbered_records(path, tolerate_torn_tail):
        yield record


def _numbered_records(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a JSON-lines file (see :func:`read_jsonl`)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if tolerate_torn_tail and number == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}: line {number} is not a JSON object ({err})") from err
        yield number, record


def read_index(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The face records of a prepared folder (``index.jsonl``), each checked (module docs).

    Raises:
        FileNotFoundError: the folder has no index (not written by ``pacofr prepare``, or the
            run has not finished) or no recipe.
        ValueError: a line of the index is not a JSON object, or a record lacks a key or holds a
            value it must not (one line naming the file, the line and the key).
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {INDEX_NAME}: prepare it with `pacofr prepare SRC {root}` "
                                "(an interrupted run writes the index only when it finishes; run it again)")
    crop_size = AlignmentRecipe.from_dict(read_recipe_dict(root)).size
    records: list[dict[str, Any]] = []
    try:
        kind = None
        for number, record in _numbered_records(path):
            record_kind = _check_face_record(record, crop_size)
            kind = kind or (number, record_kind)
            if record_kind != kind[1]:
                raise ValueError(f"line {number} names a {record_kind} but line {kind[0]} a {kind[1]}: a folder "
                                 "holds files or shards, not both")
            records.append(record)
    except ValueError as err:
        if not str(err).startswith(str(path)):
            err = ValueError(f"{path}: line {number}: {err}")
        raise ValueError(f"{err}: the index is damaged; fix or remove the line, or run "
                         f"`pacofr prepare SRC {root}` again to rewrite it") from None
    return records


#: Landmarks may lie at most this many crop sides outside the aligned crop: the alignment maps them
#: onto the template inside the crop, so a point farther out is not a face's.
_LANDMARK_MARGIN_SIDES = 1.0


def _check_face_record(record: dict[str, Any], crop_size: int) -> str:
    """Raise ValueError naming the key of ``record`` that is missing or invalid; return "file" or
    "shard" (where its pixels are)."""
    points = record.get("landmarks")
    if not _is_point_list(points, finite=False):
        raise ValueError(f"'landmarks' must be five [x, y] number pairs, got {_short(points)}")
    low, high = -_LANDMARK_MARGIN_SIDES * crop_size, (1 + _LANDMARK_MARGIN_SIDES) * crop_size
    if not all(math.isfinite(v) and low <= v <= high for p in points for v in p):
        raise ValueError(f"'landmarks' must be finite and within [{low:g}, {high:g}] (one {crop_size}-px crop "
                         f"side around the crop), got {_short(points)}")
    if "file" in record:
        file = record["file"]
        if not isinstance(file, str) or not file or file != file.strip():
            raise ValueError(f"'file' must be a path relative to the folder, got {_short(file)}")
        pure = PurePosixPath(file)
        if pure.is_absolute() or ".." in pure.parts or "\\" in file:
            raise ValueError(f"'file' must stay inside the folder (relative, no '..'), got {file!r}")
        return "file"
    if "shard" in record:
        shard = record["shard"]
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise ValueError(f"'shard' must be a file name in {SHARDS_DIR}/, got {_short(shard)}")
        for key in ("offset", "size"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise ValueError(f"'{key}' must be an integer in [0, 2^63) (bytes), got {_short(value)}")
        if record["size"] > DEFAULT_MAX_BYTES:
            raise ValueError(f"'size' must be at most {DEFAULT_MAX_BYTES} bytes (one crop), got {record['size']}")
        return "shard"
    raise ValueError("the record has neither 'file' nor 'shard': nothing says where its pixels are")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_point_list(value: Any, finite: bool) -> bool:
    """Whether ``value`` is five [x, y] pairs of numbers (finite ones when ``finite``)."""
    return (isinstance(value, list) and len(value) == 5
            and all(isinstance(p, list) and len(p) == 2
                    and all(_is_number(v) and (not finite or math.isfinite(v)) for v in p) for p in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: Types of the recipe's values (``AlignmentRecipe.to_dict``); its own checks follow in the class.
_RECIPE_TYPES = {"size": int, "scale": float, "detector": str, "border": str, "reference": str}


def read_recipe_dict(root: str | os.PathLike) -> dict[str, Any]:
    """The alignment recipe stored in a prepared folder, as a dict whose values have their types
    (``AlignmentRecipe.from_dict`` checks the rest).

    Raises:
        FileNotFoundError: no recipe.
        ValueError: not a JSON object, or a value of the wrong type (naming the file and key).
    """
    path = Path(root) / RECIPE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {RECIPE_NAME}")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = json.load(handle)
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); run `pacofr prepare SRC {root}` again to rewrite it") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a JSON object, got {_short(recipe)}")
    for key, kind in _RECIPE_TYPES.items():
        if key not in recipe:
            continue
        value = recipe[key]
        typed = _is_number(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if not typed:
            raise ValueError(f"{path}: {key!r} must be {'a number' if kind is float else kind.__name__}, "
                             f"got {_short(value)}")
    if "size" in recipe and not 8 <= recipe["size"] <= 1 << 15:
        raise ValueError(f"{path}: 'size' must be a crop side in pixels in [8, 32768], got {recipe['size']}")
    if "scale" in recipe and not (math.isfinite(recipe["scale"]) and recipe["scale"] > 0):
        raise ValueError(f"{path}: 'scale' must be a finite number > 0, got {recipe['scale']}")
    if "template" in recipe and not _is_point_list(recipe["template"], finite=True):
        raise ValueError(f"{path}: 'template' must be five [x, y] pairs of finite numbers, "
                         f"got {_short(recipe['template'])}")
    return recipe


def open_shard(root: str | os.PathLike, name: str) -> int:
    """A read-only descriptor of shard ``name`` of a prepared folder, opened without blocking and
    checked to be a regular file before it is returned (never a FIFO or a device).

    Raises:
        OSError: cannot be opened, or not a regular file.
    """
    path = Path(root) / SHARDS_DIR / name
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd
