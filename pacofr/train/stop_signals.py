"""Stopping a training run at a step boundary on SIGINT or SIGTERM, so that no finished step is lost.

SIGINT is Ctrl-C; SIGTERM is what torchrun, SLURM (``scancel``, the end of a time limit) and Kubernetes send
before they kill a job. While :class:`StopSignals` is active, the first of either only records the request: the
trainer finishes the optimiser step in flight, writes a checkpoint of it and raises :class:`TrainingStopped`,
and ``pacofr pretrain --resume`` then continues the run exactly. A second signal acts as it would without this
module: SIGINT raises ``KeyboardInterrupt`` at once, SIGTERM terminates the process (the last checkpoint on the
``train.ckpt_every`` grid stays as it was).

Handlers are installed only from the main thread and only over the default dispositions: a signal the process
inherited as ignored (SIGINT of a job a shell started in the background) stays ignored, and a handler someone
else installed stays theirs. DataLoader workers leave both signals to the main process
(:func:`leave_stop_signals_to_the_main_process`): a terminal's Ctrl-C reaches every process of the foreground
group, SLURM signals every process of the job step, and a worker that died of it would fail the main
process's next fetch before the step boundary. The main process shuts its workers down when it stops; the
price is that a worker hung in a blocking call no longer ends on SIGTERM (DataLoader's last-resort
``terminate()``), only on SIGKILL.

The handler only records the signal (no logging or I/O inside it: a handler that runs while the interrupted
code holds stderr's lock must not write to stderr); the trainer reports the request at the step boundary.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """The run stopped at a step boundary on a signal, with a checkpoint of that step.

    ``exit_code`` is the shell's convention for a process ended by the signal: 128 + its number (130 for
    SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, out_dir: Path) -> None:
        name = signal.Signals(signum).name
        kept = f"checkpoint {checkpoint} holds it" if checkpoint is not None else "rank 0 wrote its checkpoint"
        super().__init__(f"pacofr pretrain stopped by {name} after step {step}; {kept}; "
                         f"`pacofr pretrain --resume {out_dir}` continues the run")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while active, the first SIGINT / SIGTERM sets :attr:`received` instead of stopping.

    ``received`` is the number of the first stop signal, or None. Leaving the block restores the handlers it
    replaced.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._replaced: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if current is signal.default_int_handler or current == signal.SIG_DFL:
                    self._replaced[signum] = current
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._replaced.items():
            signal.signal(signum, handler)
        self._replaced.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        # asked twice: stop now, as the replaced disposition would have
        restored = self._replaced.get(signum)
        self._restore()
        if restored is signal.default_int_handler:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # SIG_DFL again: terminate


def leave_stop_signals_to_the_main_process() -> None:
    """In a DataLoader worker: ignore SIGINT and SIGTERM (the main process stops the run and its workers)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
