"""The run-folder lock: a second writer is refused naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pacofr.train.lock import LOCK_FILE, RunFolderLockedError, RunLock


def _holder_process(folder: Path) -> subprocess.Popen[str]:
    """A process that takes the lock of ``folder``, says so, then sleeps until it is killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from pacofr.train.lock import RunLock
        RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_naming_pid_host_and_start_time(tmp_path: Path) -> None:
    holder = _holder_process(tmp_path)
    try:
        with pytest.raises(RunFolderLockedError) as err:
            RunLock(tmp_path).acquire()
        text = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in text
        assert str(tmp_path) in text and "\n" not in text
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    holder = _holder_process(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the dead holder
    with caplog.at_level("WARNING", logger="pacofr.train.lock"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"from a process that is gone: pid {holder.pid}" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean release leaves no holder behind
    caplog.clear()
    with caplog.at_level("WARNING", logger="pacofr.train.lock"), RunLock(tmp_path):
        pass
    assert "gone" not in caplog.text


def test_a_lock_is_exclusive_within_one_process_too_and_free_after_release(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "new" / "run")  # creates the folder
    first.acquire()
    with pytest.raises(RunFolderLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "new" / "run").acquire()
    first.release()
    first.release()  # idempotent
    started = time.monotonic()
    with RunLock(tmp_path / "new" / "run"):
        pass
    assert time.monotonic() - started < 5
