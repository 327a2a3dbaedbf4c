"""Training checkpoints: written atomically, self-describing, the last N kept.

A checkpoint is a folder ``step_XXXXXXXX`` holding

- ``model.safetensors``: the model's weights and buffers (metadata: ``pacofr_meta`` = meta.json);
- ``state.pt``: optimiser, schedule, scaler, RNG states, step/epoch, sampler position, counters —
  tensors, numbers, strings and containers only, so ``torch.load(weights_only=True)`` reads it;
- ``meta.json``: the run config, the face-alignment recipe, the package version, step and epoch;
- ``checksums.json``: the size and SHA-256 of each of the three files above, written last.

The folder is assembled under a hidden temporary name and renamed into place with
``os.replace`` once every file is flushed to disk, so a crash never leaves a half-written
``step_*`` folder: readers only ever see complete checkpoints. Old checkpoints are deleted the
same way round (renamed out of the ``step_*`` namespace first), so an interrupted pruning leaves
no half-deleted ``step_*`` folder either.

Loading verifies every file against ``checksums.json`` before parsing it: a checkpoint that was
changed, truncated or emptied after it was written raises :class:`CorruptCheckpointError` (one
line naming the folder and file), as does any file that cannot be parsed.
:func:`find_intact_checkpoint` falls back from a corrupted newest checkpoint to the newest
intact one, saying which it skipped and why. Checkpoints written before checksums existed
(``meta.json`` without ``checkpoint_format``) still load, unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from pacofr.data.storage import give_default_mode

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
CHECKPOINT_DIR = "checkpoints"
#: ``meta.json`` key of the on-disk format; 2: the folder has ``checksums.json`` (absent: older, unverified)
FORMAT_KEY = "checkpoint_format"
FORMAT_VERSION = 2
_DATA_FILES = (WEIGHTS_FILE, STATE_FILE, META_FILE)
_HASH_CHUNK = 1 << 20
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_SWAPPED_RE = re.compile(rf"^{re.escape(_TMP_PREFIX)}old-(step_\d{{8,}})-\d+$")
T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that differs from what was written (checksum, size) or cannot be parsed.

    The message is one line naming the checkpoint folder and the file."""


class TrainingState(dict):
    """The training-state dict of a checkpoint (``state.pt``): reading a part it lacks raises a
    one-line :class:`CorruptCheckpointError` naming the checkpoint and the part, not a KeyError."""

    def __init__(self, folder: Path, parts: dict[str, Any]) -> None:
        super().__init__(parts)
        self.folder = folder

    def __missing__(self, key: str) -> Any:
        raise CorruptCheckpointError(f"checkpoint {self.folder}: {STATE_FILE} holds no {key!r} (it holds "
                                     f"{sorted(map(str, self))[:8]}): not written by this version's trainer, or edited")


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its folder, meta data and training state (weights load apart)."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def config(self) -> dict[str, Any]:
        """The run config stored in ``meta.json`` (``PretrainConfig.to_dict``).

        Raises:
            CorruptCheckpointError: ``meta.json`` holds no config mapping.
        """
        config = self.meta.get("config")
        if not isinstance(config, dict):
            raise CorruptCheckpointError(f"checkpoint {self.path}: {META_FILE} holds no run config (key 'config', "
                                         f"a mapping; got {type(config).__name__}), so the model cannot be rebuilt")
        return config


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after optimiser step ``step``."""
    return f"step_{step:08d}"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, Any]:
    """The ``checksums.json`` content for the data files in ``folder``."""
    return {"algorithm": "sha256",
            "files": {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                      for name in _DATA_FILES}}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swapped_out_name(tmp: Path) -> str | None:
    """``step_X`` when ``tmp`` is a complete checkpoint that a re-save of step X had moved aside
    (``.tmp-old-step_X-PID``) and whose replacement never arrived; else None."""
    match = _SWAPPED_RE.match(tmp.name)
    if match is None or not _is_complete(tmp) or (tmp.parent / match.group(1)).exists():
        return None
    return match.group(1)


def _remove_stale_temporaries(directory: Path) -> None:
    """Clean up after an earlier, crashed save: a checkpoint it had moved aside to re-save the same
    step goes back into place; incomplete temporary folders are deleted."""
    for tmp in directory.glob(f"{_TMP_PREFIX}*"):
        if not tmp.is_dir():
            continue
        name = _swapped_out_name(tmp)
        if name is not None:
            logger.warning("restoring checkpoint %s that an interrupted save had moved aside", name)
            os.replace(tmp, directory / name)
        else:
            logger.warning("removing %s, left by an interrupted save or pruning", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(directory: str | Path, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 0) -> Path:
    """Write a checkpoint of ``model`` + ``state`` into ``directory``; return its folder.

    ``meta`` must hold ``step`` and ``epoch`` and be JSON-serialisable. ``keep_last`` > 0 deletes
    all but the newest ``keep_last`` complete checkpoints after a successful save. Any error
    while writing leaves the existing checkpoints untouched and removes the partial files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    final = directory / checkpoint_name(int(meta["step"]))
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    meta_json = json.dumps({**meta, FORMAT_KEY: FORMAT_VERSION}, indent=2, sort_keys=True)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"pacofr_meta": meta_json})
        give_default_mode(tmp / WEIGHTS_FILE)  # safetensors creates it 0600; the other files follow the umask
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(meta_json + "\n")
        for name in _DATA_FILES:
            _fsync_file(tmp / name)
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(_checksums(tmp), indent=2) + "\n")
        _fsync_file(tmp / CHECKSUMS_FILE)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. right after a resume): swap it out
            old = directory / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)  # already out of the step_* namespace
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    if keep_last > 0:
        for stale in list_checkpoints(directory)[:-keep_last]:
            delete_checkpoint(stale)
            logger.debug("removed old checkpoint %s", stale)
    return final


def delete_checkpoint(path: str | Path) -> None:
    """Delete checkpoint folder ``path``: renamed to a hidden temporary name first (one atomic step),
    then removed, so an interruption never leaves a half-deleted ``step_*`` folder (the hidden
    rest is cleaned up by the next save)."""
    path = Path(path)
    doomed = path.parent / f"{_TMP_PREFIX}drop-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _DATA_FILES)


def _check_complete(folder: Path) -> None:
    """Raise ``FileNotFoundError`` naming the files checkpoint ``folder`` lacks."""
    missing = [name for name in _DATA_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} is incomplete: {', '.join(missing)} missing (needs "
                                f"{', '.join(_DATA_FILES)}); name an older checkpoint folder explicitly to use it")


def checkpoint_area_of(path: str | Path) -> Path | None:
    """The checkpoint folder, or folder of checkpoints, that ``path`` is or lies inside (after
    resolving links and ``..``); None when it is in neither."""
    for folder in (Path(path).resolve(), *Path(path).resolve().parents):
        if not folder.is_dir():
            continue
        is_checkpoint = (_NAME_RE.match(folder.name) or folder.name.startswith(_TMP_PREFIX)) and any(
            (folder / name).exists() for name in (*_DATA_FILES, CHECKSUMS_FILE))
        if is_checkpoint or _candidates(folder):
            return folder
    return None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest (lowest step) first (including one that a
    crashed re-save left moved aside, under its temporary name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _NAME_RE.match(child.name)
        if match and child.is_dir() and _is_complete(child):
            found.append((int(match.group(1)), child))
        elif child.is_dir() and (name := _swapped_out_name(child)) is not None:
            found.append((checkpoint_step(name), child))
    return [path for _, path in sorted(found)]


def checkpoint_step(name: str | Path) -> int:
    """The optimiser step of a checkpoint folder named ``step_XXXXXXXX``."""
    match = _NAME_RE.match(Path(name).name)
    if match is None:
        raise ValueError(f"{name} is not a checkpoint folder name (step_XXXXXXXX)")
    return int(match.group(1))


def remove_checkpoints_after(directory: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints in ``directory`` taken after optimiser step ``step`` (a run resumed
    from an earlier checkpoint abandons them); returns what was deleted.

    A folder whose ``meta.json`` is of another step than its name says (renamed by hand) was never
    taken by this run: it is left in place with a warning, not deleted."""
    newer = []
    for path in list_checkpoints(directory):
        if not _NAME_RE.match(path.name) or checkpoint_step(path) <= step:
            continue
        try:
            _check_named_after_its_step(path)
        except (CorruptCheckpointError, FileNotFoundError) as err:
            logger.warning("left in place, not deleted with the abandoned checkpoints: %s", err)
            continue
        newer.append(path)
    for path in newer:
        delete_checkpoint(path)
    return newer


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint, a ``checkpoints`` folder, or a run folder
    (then its newest checkpoint). Raises ``FileNotFoundError`` naming what was searched."""
    path = Path(path)
    if _NAME_RE.match(path.name) and path.is_dir():
        _check_complete(path)
        return path
    for candidate_dir in (path, path / CHECKPOINT_DIR):
        found = _candidates(candidate_dir)
        if found:
            _check_complete(found[0])  # the newest, never silently an older one
            return found[0]
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for step_* folders in it and in "
                            f"{path / CHECKPOINT_DIR})")


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (parsers' messages can span many lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _parse(folder: Path, name: str, reader: Callable[[Path], T]) -> T:
    """``reader(folder / name)``, any failure to parse turned into a one-line CorruptCheckpointError."""
    try:
        return reader(folder / name)
    except CorruptCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - every parser's own error type means "cannot be read"
        raise CorruptCheckpointError(f"checkpoint {folder}: {name} cannot be loaded ({_one_line(err)})") from err


def _read_meta_file(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "epoch")):
        raise ValueError("expected a JSON object with integer step and epoch")
    return meta


def _read_checksums_file(path: Path) -> dict[str, dict[str, Any]]:
    files = json.loads(path.read_bytes().decode("utf-8"))["files"]
    for name in _DATA_FILES:
        entry = files[name]
        if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
            raise ValueError(f"bad entry for {name}")
    return files


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of checkpoint folder ``path`` (not verified: see :func:`verify_checkpoint`)."""
    folder = Path(path)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {META_FILE}")
    return _parse(folder, META_FILE, _read_meta_file)


def _check_named_after_its_step(folder: Path) -> None:
    """Raise :class:`CorruptCheckpointError` when a ``step_X`` folder's ``meta.json`` is of another
    step (a renamed folder: taken for the newest, it would make a resume drop the real newest)."""
    match = _NAME_RE.match(folder.name)
    if match is None:
        return
    step = read_meta(folder)["step"]
    if step != int(match.group(1)):
        raise CorruptCheckpointError(f"checkpoint {folder}: its {META_FILE} is of step {step}, not of the step "
                                     f"its name says (renamed?); name it {checkpoint_name(step)} or move it away")


def verify_checkpoint(path: str | Path) -> bool:
    """Check every file of checkpoint folder ``path`` against its ``checksums.json``.

    Returns True when verified, False for a checkpoint written before checksums existed (logged).
    Raises ``FileNotFoundError`` when a file is missing and :class:`CorruptCheckpointError` when one
    differs from what was written (size or SHA-256) or the checksums themselves are unreadable.
    """
    folder = Path(path)
    _check_complete(folder)
    _check_named_after_its_step(folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        if FORMAT_KEY in read_meta(folder):
            raise CorruptCheckpointError(f"checkpoint {folder}: {CHECKSUMS_FILE} is missing, so its files "
                                         "cannot be verified")
        logger.warning("checkpoint %s was written before checkpoints carried checksums: loading it unverified",
                       folder)
        return False
    expected = _parse(folder, CHECKSUMS_FILE, _read_checksums_file)
    for name in _DATA_FILES:
        size = (folder / name).stat().st_size
        if size != expected[name]["size"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is {size} bytes, but was written with "
                                         f"{expected[name]['size']} (truncated or replaced)")
        digest = file_sha256(folder / name)
        if digest != expected[name]["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} does not match its checksum (sha256 "
                                         f"{digest[:12]}..., written {expected[name]['sha256'][:12]}...): "
                                         "the file changed after it was written")
    return True


def _candidates(directory: Path) -> list[Path]:
    """Every ``step_*`` folder (complete or not) and moved-aside checkpoint in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(checkpoint_step(child), child) for child in directory.iterdir()
             if child.is_dir() and _NAME_RE.match(child.name)]
    found += [(checkpoint_step(name), child) for child in directory.iterdir()
              if child.is_dir() and (name := _swapped_out_name(child)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def find_intact_checkpoint(path: str | Path) -> Path:
    """The checkpoint meant by ``path``, verified (see :func:`verify_checkpoint`).

    A checkpoint folder must itself be intact. For a run folder or a ``checkpoints`` folder this is
    the newest intact checkpoint: newer ones that are incomplete or corrupted are skipped with a
    warning naming each and why. Raises ``FileNotFoundError`` when there is no checkpoint at all
    and :class:`CorruptCheckpointError` when none is intact (listing why for each).
    """
    path = Path(path)
    if _NAME_RE.match(path.name) and path.is_dir():
        verify_checkpoint(path)
        return path
    for directory in (path, path / CHECKPOINT_DIR):
        candidates = _candidates(directory)
        if not candidates:
            continue
        skipped = []
        for candidate in candidates:
            try:
                verify_checkpoint(candidate)
            except (CorruptCheckpointError, FileNotFoundError) as err:
                logger.warning("skipping checkpoint %s: %s", candidate.name, err)
                skipped.append(f"{candidate.name}: {err}")
                continue
            if skipped:
                logger.warning("using %s, the newest intact checkpoint in %s (%d newer one(s) skipped)",
                               candidate.name, directory, len(skipped))
            return candidate
        raise CorruptCheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(skipped))
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for step_* folders in it and in "
                            f"{path / CHECKPOINT_DIR})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    fallback: bool = False) -> Checkpoint:
    """Verify and read the meta data and training state of checkpoint ``path``.

    ``path`` is a checkpoint, a ``checkpoints`` folder or a run folder (its newest checkpoint, see
    :func:`resolve_checkpoint`); with ``fallback`` a folder gives its newest *intact* checkpoint
    instead (:func:`find_intact_checkpoint`). Raises :class:`CorruptCheckpointError` for a
    corrupted checkpoint and ``FileNotFoundError`` for a missing or incomplete one.
    """
    folder = find_intact_checkpoint(path) if fallback else resolve_checkpoint(path)
    if not fallback:
        verify_checkpoint(folder)
    meta = read_meta(folder)
    state = _parse(folder, STATE_FILE, lambda file: torch.load(file, map_location=map_location, weights_only=True))
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint {folder}: {STATE_FILE} holds a {type(state).__name__}, "
                                     "not the training-state dict")
    return Checkpoint(path=folder, meta=meta, state=TrainingState(folder, state))


def load_weights(model: torch.nn.Module, source: str | Path | Checkpoint, strict: bool = True) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (on the model's device).

    ``source``: a :class:`Checkpoint` from :func:`load_checkpoint` (already verified), or a path
    as for :func:`load_checkpoint` (verified here). Raises :class:`CorruptCheckpointError` when the
    file cannot be read or does not fit ``model`` (with ``strict``).
    """
    if isinstance(source, Checkpoint):
        folder = source.path
    else:
        folder = resolve_checkpoint(source)
        verify_checkpoint(folder)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    missing, unexpected = _parse(folder, WEIGHTS_FILE,
                                 lambda file: load_model(model, str(file), strict=strict, device=str(device)))
    if missing or unexpected:
        logger.warning("checkpoint %s: missing keys %s, unexpected keys %s", folder, missing, unexpected)


def read_weights_meta(weights_file: str | Path) -> dict[str, Any]:
    """The meta data stored inside a ``model.safetensors`` written by :func:`save_checkpoint`."""
    def read(file: Path) -> dict[str, Any]:
        with safe_open(str(file), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return json.loads(metadata.get("pacofr_meta", "{}"))

    weights_file = Path(weights_file)
    return _parse(weights_file.parent, weights_file.name, read)
