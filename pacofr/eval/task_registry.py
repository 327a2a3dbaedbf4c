"""Registry of evaluation tasks: each becomes ``pacofr eval <name>``.

A task is an :class:`EvalTask`: its own command-line arguments and a function that evaluates an
already opened row (:class:`pacofr.eval.extractors.Extractor`: an encoder or a baseline) and
returns a JSON-friendly result with a one-line ``headline``. The ``eval`` command supplies what
every task shares (``--checkpoint``, ``--out``, ``--seeds``, ``--device``), opens the row and
writes ``OUT/<name>.json``.

Adding a task (a face-parsing head, say) is one new module that calls :func:`register` at import
time, plus its name in :data:`TASK_MODULES`; nothing else changes.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pacofr.eval.extractors import Extractor

TASK_MODULES: tuple[str, ...] = ("pacofr.eval.user_data_commands", "pacofr.eval.face_protocol_commands")


@dataclass(frozen=True)
class TaskContext:
    """What the ``eval`` command hands every task besides the encoder and its own arguments."""

    seeds: tuple[int, ...]
    device: str
    scratch: Path  # a temporary folder the task may write (e.g. a materialised proxy set)
    batch_size: int = 64  # images per feature-extraction batch


@dataclass(frozen=True)
class EvalTask:
    """One evaluation: ``add_arguments(parser)`` adds its options; ``run(extractor, args, context)``
    returns a JSON-friendly dict holding at least ``headline`` (one line for the terminal).
    ``run`` raises ValueError naming the offending argument on bad input."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Extractor, argparse.Namespace, TaskContext], dict[str, Any]]


_TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    """Add ``task`` to the registry (its name must be new)."""
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"an evaluation task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def all_tasks() -> dict[str, EvalTask]:
    """Every registered task by name (imports :data:`TASK_MODULES` first)."""
    for module in TASK_MODULES:
        importlib.import_module(module)
    return dict(_TASKS)


def get_task(name: str) -> EvalTask:
    """The task called ``name`` (ValueError listing the known ones otherwise)."""
    tasks = all_tasks()
    if name not in tasks:
        raise ValueError(f"unknown evaluation task {name!r}; known: {sorted(tasks)}")
    return tasks[name]
