"""Training checkpoints: written atomically, self-describing, the last N kept.

A checkpoint is a folder ``step_XXXXXXXX`` holding

- ``model.safetensors``: the model's weights and buffers (metadata: ``pacofr_meta`` = meta.json);
- ``state.pt``: optimiser, schedule, scaler, RNG states, step/epoch, sampler position, counters —
  tensors, numbers, strings and containers only, so ``torch.load(weights_only=True)`` reads it;
- ``meta.json``: the run config, the face-alignment recipe, the package version, step and epoch.

The folder is assembled under a hidden temporary name and renamed into place with
``os.replace`` once every file is flushed to disk, so a crash never leaves a half-written
``step_*`` folder: readers only ever see complete checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_SWAPPED_RE = re.compile(rf"^{re.escape(_TMP_PREFIX)}old-(step_\d{{8,}})-\d+$")


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


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after optimiser step ``step``."""
    return f"step_{step:08d}"


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
        if not tmp.is_dir() or tmp.name.endswith(f"-{os.getpid()}"):
            continue
        name = _swapped_out_name(tmp)
        if name is not None:
            logger.warning("restoring checkpoint %s that an interrupted save had moved aside", name)
            os.replace(tmp, directory / name)
        else:
            logger.warning("removing the incomplete checkpoint %s left by an interrupted save", tmp)
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
    meta_json = json.dumps(meta, indent=2, sort_keys=True)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"pacofr_meta": meta_json})
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(meta_json + "\n")
        for name in (WEIGHTS_FILE, STATE_FILE, META_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. right after a resume): swap it out
            old = directory / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    if keep_last > 0:
        for stale in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
            logger.debug("removed old checkpoint %s", stale)
    return final


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (WEIGHTS_FILE, STATE_FILE, META_FILE))


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
    from an earlier checkpoint abandons them); returns what was deleted."""
    newer = [path for path in list_checkpoints(directory) if _NAME_RE.match(path.name)
             and checkpoint_step(path) > step]
    for path in newer:
        shutil.rmtree(path)
    return newer


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint, a ``checkpoints`` folder, or a run folder
    (then its newest checkpoint). Raises ``FileNotFoundError`` naming what was searched."""
    path = Path(path)
    if _NAME_RE.match(path.name) and path.is_dir():
        if not _is_complete(path):
            raise FileNotFoundError(f"checkpoint {path} is incomplete (needs {WEIGHTS_FILE}, {STATE_FILE}, {META_FILE})")
        return path
    for candidate_dir in (path, path / CHECKPOINT_DIR):
        found = list_checkpoints(candidate_dir)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for step_* folders in it and in "
                            f"{path / CHECKPOINT_DIR})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read the meta data and training state of checkpoint ``path`` (see :func:`resolve_checkpoint`)."""
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / META_FILE).read_text())
    state = torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
    return Checkpoint(path=folder, meta=meta, state=state)


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load ``model.safetensors`` of checkpoint ``path`` into ``model`` (on the model's device)."""
    folder = resolve_checkpoint(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=strict, device=str(device))
    if missing or unexpected:
        logger.warning("checkpoint %s: missing keys %s, unexpected keys %s", folder, missing, unexpected)


def read_weights_meta(weights_file: str | Path) -> dict[str, Any]:
    """The meta data stored inside a ``model.safetensors`` written by :func:`save_checkpoint`."""
    with safe_open(str(weights_file), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return json.loads(metadata.get("pacofr_meta", "{}"))
