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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
        yield record


def read_index(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The face records of a prepared folder (``index.jsonl``).

    Raises:
        FileNotFoundError: the folder has no index (not written by ``pacofr prepare``, or the
            run has not finished).
        ValueError: a line of the index is not a JSON object (one line naming file and line).
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {INDEX_NAME}: prepare it with `pacofr prepare SRC {root}` "
                                "(an interrupted run writes the index only when it finishes; run it again)")
    try:
        return list(read_jsonl(path))
    except ValueError as err:
        raise ValueError(f"{err}: the index is damaged; run `pacofr prepare SRC {root}` again to rewrite it") from None


def read_recipe_dict(root: str | os.PathLike) -> dict[str, Any]:
    """The alignment recipe stored in a prepared folder, as a dict."""
    path = Path(root) / RECIPE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {RECIPE_NAME}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
