"""``pacofr eval <face task>``: one command per task with a fixed protocol (:mod:`pacofr.eval.face_protocols`).

Example::

    pacofr eval fer2013 --checkpoint runs/demo --data-root /work/shared/data --out eval/fer
    pacofr eval ytf-landmarks --checkpoint baseline:hog --data-root /work/shared/data --out eval/hog

Every protocol of :mod:`pacofr.eval.evaluate` runs (``--protocols`` picks some), through the
same code path as the study. Only argument parsing is imported when the command line is built.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from pacofr.eval.face_protocols import FACE_TASKS
from pacofr.eval.choices import PROTOCOLS
from pacofr.eval.task_registry import EvalTask, TaskContext, register
from pacofr.eval.user_data_commands import float_grid, positive_int

if TYPE_CHECKING:
    from pacofr.eval.evaluate import EvalPlan
    from pacofr.eval.extractors import Extractor

DATA_ROOT_ENV = "PACOFR_DATA_ROOT"
def protocol_list(text: str) -> tuple[str, ...]:
    """argparse type: ``all`` or comma-separated protocols."""
    names = PROTOCOLS if text.strip() == "all" else tuple(p.strip() for p in text.split(",") if p.strip())
    if not names or any(p not in PROTOCOLS for p in names):
        raise argparse.ArgumentTypeError(f"must be 'all' or a comma-separated list of {PROTOCOLS}, got {text!r}")
    return names


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the face sets are and which protocols run with which budgets (shared with ``faces``
    and ``study``)."""
    parser.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV),
                        help=f"folder laid out as /work/shared/data (default: ${DATA_ROOT_ENV})")
    parser.add_argument("--protocols", type=protocol_list, default=PROTOCOLS,
                        help="linear (probe; ridge for numbers), knn (cosine, k=20), mlp (small head; numbers and "
                             "landmarks only), finetune (encoders only), or all (default)")
    parser.add_argument("--probe-epochs", type=positive_int, default=100, help="epochs of the linear and MLP heads")
    parser.add_argument("--finetune-steps", type=positive_int, default=100, help="optimiser steps of a fine-tune")
    parser.add_argument("--finetune-lr", type=float_grid, default=(2e-4, 1e-3),
                        help="fine-tune encoder learning rates, picked on val")


def data_root(args: argparse.Namespace) -> str:
    """``--data-root`` (ValueError when unset)."""
    if not args.data_root:
        raise ValueError(f"--data-root is required (or set ${DATA_ROOT_ENV}): a folder laid out as /work/shared/data")
    return args.data_root


def plan_from_args(args: argparse.Namespace, seeds: tuple[int, ...], device: str, batch_size: int = 64) -> EvalPlan:
    """The :class:`~pacofr.eval.evaluate.EvalPlan` of :func:`add_plan_arguments`' options."""
    from pacofr.eval.evaluate import EvalPlan
    from pacofr.eval.finetune import FinetuneConfig
    from pacofr.eval.probe_protocols import ProbeConfig

    if min(args.finetune_lr) <= 0:
        raise ValueError(f"--finetune-lr values must be > 0, got {args.finetune_lr}")
    probe = ProbeConfig(seeds=seeds, probe_epochs=args.probe_epochs, mlp_epochs=args.probe_epochs)
    tune = FinetuneConfig(steps=args.finetune_steps, lrs=args.finetune_lr, seeds=seeds)
    return EvalPlan(protocols=args.protocols, probe=probe, finetune=tune, device=device, batch_size=batch_size)


def _run(name: str) -> Any:
    def run(extractor: Extractor, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
        from pacofr.eval.evaluate import evaluate_sets
        from pacofr.eval.face_protocols import load_tasks
        from pacofr.eval.user_data_commands import headline

        try:
            sets = load_tasks([name], data_root(args))
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--data-root {args.data_root}: {err}") from err
        task = evaluate_sets(extractor, sets, plan_from_args(args, context.seeds, context.device,
                                                             context.batch_size))[name]
        return {**task, "headline": headline(name, task)}

    return run


for _task in FACE_TASKS.values():
    register(EvalTask(name=_task.name, help=f"{_task.title}; {_task.protocol}".replace("%", "%%"),
                      add_arguments=add_plan_arguments, run=_run(_task.name)))
