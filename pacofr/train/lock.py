"""An exclusive lock per run folder, so that two training runs never write into the same one.

:class:`RunLock` holds an advisory ``flock`` on ``<run folder>/.pacofr-run.lock`` and writes its
holder (pid, host, start time, command) into the file. The kernel drops the lock when the holder
exits in any way, kill -9 included, so a lock file that still names a holder but is not locked
was left by a process that is gone: the next run takes it over with a warning naming it. A
clean release empties the file (it is never deleted: deleting would let two newcomers lock two
different files). Where the file system has no ``flock`` (some network file systems) the run
goes on unlocked after a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOCK_FILE = ".pacofr-run.lock"
_COMMAND_CHARS = 200


class RunFolderLockedError(RuntimeError):
    """The run folder is held by another live process; the message names it."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run folder's lock."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    @classmethod
    def this_process(cls) -> LockHolder:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started, " ".join(sys.argv)[:_COMMAND_CHARS])

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder recorded in a lock file's text; None when it is empty or unreadable."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["started"]), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started} ({self.command})"


def _read_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 1 << 16).decode("utf-8", errors="replace")


class RunLock:
    """Exclusive lock on run folder ``folder`` (created if missing); a context manager.

    ``acquire`` raises :class:`RunFolderLockedError` naming the holder when another process has it.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = _read_text(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = LockHolder.parse(text)
                who = holder.describe() if holder else "a process that has not written its name yet"
                raise RunFolderLockedError(f"{self.folder} is in use by another pacofr run: {who}; wait for it to "
                                           "finish, stop it, or choose another output folder") from None
            logger.warning("cannot lock %s (%s): this file system has no flock, so nothing stops a second run "
                           "from writing into the same folder", self.path, err)
            return
        previous = LockHolder.parse(_read_text(fd))
        if previous is not None:
            logger.warning("taking over the lock of %s from a process that is gone: %s", self.folder,
                           previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(LockHolder.this_process())).encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file and unlock it (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
