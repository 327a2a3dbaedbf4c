"""A training run's output folder: its files, the lock a run holds on it, and the rules for an earlier run.

One run writes ``config.yaml``, ``scalars.csv``, ``checkpoints/step_*``, ``viz/step_*.png``,
``reconstructions.png``, ``loss_curve.png`` and ``tensorboard/`` into its folder. The rules:

- while a run is training, it holds the folder's :class:`~pacofr.train.lock.RunLock` (rank 0 takes
  it; every rank fails with :class:`~pacofr.train.lock.RunFolderLockedError` when it cannot);
- a fresh run refuses a folder holding an earlier run (it would mix their scalars and
  checkpoints) unless told to overwrite it, which deletes that run's files;
- a resumed run abandons the checkpoints taken after the one it resumes from.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from pacofr import checkpoint as ckpt
from pacofr.train.distributed import DistInfo, all_true, gather_objects
from pacofr.train.lock import RunFolderLockedError, RunLock

logger = logging.getLogger(__name__)

SCALARS_FILE = "scalars.csv"
LOSS_CURVE_FILE = "loss_curve.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
CONFIG_FILE = "config.yaml"
VIZ_DIR = "viz"
TENSORBOARD_DIR = "tensorboard"


class RunFolder:
    """The output folder ``path`` of one run, seen from rank ``dist.rank`` (rank 0 touches the disk)."""

    def __init__(self, path: str | Path, dist: DistInfo) -> None:
        self.path = Path(path)
        self.dist = dist

    @property
    def checkpoints(self) -> Path:
        """The folder of the run's ``step_*`` checkpoints."""
        return self.path / ckpt.CHECKPOINT_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock for the block (rank 0 takes it; every rank fails if it cannot)."""
        lock, refusal = RunLock(self.path), None
        if self.dist.is_main:
            try:
                lock.acquire()
            except RunFolderLockedError as err:
                refusal = str(err)
        refusal = gather_objects(refusal, self.dist)[0]
        if refusal is not None:
            raise RunFolderLockedError(refusal)
        try:
            yield
        finally:
            lock.release()

    def earlier_run_files(self) -> list[Path]:
        """What an earlier run left here: checkpoints, scalars, pictures."""
        files = ckpt.list_checkpoints(self.checkpoints)
        files += [path for path in (self.path / name for name in (SCALARS_FILE, LOSS_CURVE_FILE,
                                                                  RECONSTRUCTIONS_FILE, VIZ_DIR))
                  if path.exists()]
        return files

    def claim(self, fresh: bool, overwrite: bool) -> None:
        """Create the folder. A fresh run refuses a folder holding an earlier run unless ``overwrite``,
        which deletes that run's files (collective: call on every rank)."""
        earlier: list[Path] = []
        if self.dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            earlier = self.earlier_run_files() if fresh else []
        if not all_true(not earlier or overwrite, self.dist):
            raise FileExistsError(f"{self.path} holds an earlier run ({[p.name for p in earlier][:4]} on rank 0): "
                                  "resume it (--resume), choose another output folder, or pass --overwrite "
                                  "to delete its checkpoints, scalars and pictures")
        for path in earlier:
            logger.warning("--overwrite: deleting %s of the earlier run", path)
            if path.parent.name == ckpt.CHECKPOINT_DIR:
                ckpt.delete_checkpoint(path)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def abandon_checkpoints_after(self, step: int) -> None:
        """A run resumed at optimiser step ``step`` deletes this folder's later checkpoints (rank 0)."""
        if not self.dist.is_main:
            return
        abandoned = ckpt.remove_checkpoints_after(self.checkpoints, step)
        if abandoned:
            logger.warning("resuming at step %d abandons the later checkpoints of this run folder; "
                           "deleted %s", step, [p.name for p in abandoned])
