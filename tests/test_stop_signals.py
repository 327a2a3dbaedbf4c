"""pacofr.train.stop_signals: the first SIGINT / SIGTERM is recorded, a second acts at once, inherited
ignores and other handlers are left alone, and the replaced handlers come back."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pacofr.train.stop_signals import StopSignals, TrainingStopped


@pytest.fixture()
def default_dispositions() -> Iterator[None]:
    """SIGINT and SIGTERM as a foreground process has them (a test runner may have changed them); restored after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("default_dispositions")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_is_recorded_and_the_handlers_come_back(signum: int) -> None:
    with StopSignals() as stop:
        assert stop.received is None
        signal.raise_signal(signum)
        assert stop.received == signum
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.usefixtures("default_dispositions")
def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once() -> None:
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_second_signal_over_sig_dfl_terminates_the_process(name: str) -> None:
    """A replaced SIG_DFL comes back as SIG_DFL: the second signal ends the process as it would have without
    StopSignals (SIGTERM's usual disposition; SIGINT's when the process was started so)."""
    script = ("import os, signal, time\n"
              "from pacofr.train.stop_signals import StopSignals\n"
              f"signum = signal.{name}\n"
              "signal.signal(signum, signal.SIG_DFL)\n"
              "with StopSignals() as stop:\n"
              "    os.kill(os.getpid(), signum)\n"
              "    print('recorded', stop.received == signum, flush=True)\n"
              "    os.kill(os.getpid(), signum)\n"
              "    time.sleep(30)\n"
              "print('not reached', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -getattr(signal, name), done.stderr
    assert done.stdout.split() == ["recorded", "True"]


@pytest.mark.usefixtures("default_dispositions")
def test_an_inherited_ignore_and_a_foreign_handler_stay() -> None:
    def foreign(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, foreign)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is foreign
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is foreign


def test_the_trainers_loader_workers_leave_both_signals_to_the_main_process() -> None:
    """The trainer's worker_init_fn (a fresh interpreter, as a spawn or forkserver worker starts: a forked
    worker would inherit the main process's handlers and hide a missing call)."""
    script = ("import signal\n"
              "from pacofr.train.trainer import _init_loader_worker\n"
              "_init_loader_worker(0)\n"
              "signal.raise_signal(signal.SIGINT)\n"
              "signal.raise_signal(signal.SIGTERM)\n"
              "print('alive', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["alive"], done.stderr


def test_the_stop_error_names_the_signal_the_step_and_how_to_continue(tmp_path) -> None:
    error = TrainingStopped(signal.SIGTERM, 42, tmp_path / "checkpoints" / "step_00000042", tmp_path)
    assert error.exit_code == 143 and error.step == 42
    assert str(error) == (f"pacofr pretrain stopped by SIGTERM after step 42; checkpoint "
                          f"{tmp_path / 'checkpoints' / 'step_00000042'} holds it; "
                          f"`pacofr pretrain --resume {tmp_path}` continues the run")
    assert TrainingStopped(signal.SIGINT, 1, None, tmp_path).exit_code == 130
