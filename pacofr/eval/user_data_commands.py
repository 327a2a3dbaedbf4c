"""``pacofr eval linear-probe | knn | finetune`` on a user's labelled images (``--data``).

Only argument parsing lives here (imported when the command line is built); the work is done by
:func:`pacofr.eval.evaluate.evaluate_sets`, imported when a task runs, the same code path as the
fixed face tasks and the study.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pacofr.eval.choices import POOLS
from pacofr.eval.task_registry import EvalTask, TaskContext, register

if TYPE_CHECKING:
    from pacofr.eval.extractors import Extractor
    from pacofr.eval.labelled import LabelledSet

DATA_HELP = ("labelled images: a folder with one sub-folder per class; a CSV with a 'path' column and a label "
             "column ('label', or 'labels' with ';'-separated attributes, or --label NAME); an .npz with an image "
             "array and a label array; or proxy:lfw-face-vs-nonface (a face/non-face PROXY from scikit-image)")


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from err
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def float_grid(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite numbers >= 0 (a hyper-parameter grid)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from err
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated finite numbers >= 0, got {text!r}")
    return values


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and the options that say how to read it."""
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--images", default=None,
                        help="folder or .zip holding the images a CSV's paths name (default: the CSV's folder)")
    parser.add_argument("--label", default=None,
                        help="CSV column / npz array of the target (default: 'label' or 'labels'; npz: 'labels')")
    parser.add_argument("--regression", action="store_true",
                        help="the label is a number (e.g. an age): a regression head, scored by mean absolute error")
    parser.add_argument("--unit", default="", help="unit of a regression label, for the report (e.g. years)")
    parser.add_argument("--split-column", default=None,
                        help="CSV column / npz array with train/val/test (default: 'split' when present; '' to "
                             "ignore it); without one, a fixed hash of each image's path (or group) splits 70/15/15")
    parser.add_argument("--group-column", default=None,
                        help="CSV column / npz array (e.g. a person id): images sharing it share a split")


def open_user_data(args: argparse.Namespace, context: TaskContext) -> LabelledSet:
    """The labelled set of ``--data`` and its options (errors name ``--data``)."""
    from pacofr.eval.data_sources import open_data
    from pacofr.eval.readers import DataOptions

    options = DataOptions(label=args.label, regression=args.regression, unit=args.unit, split=args.split_column,
                          group=args.group_column, images=args.images)
    try:
        return open_data(args.data, context.scratch, options)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--data {args.data}: {err}") from err


def _result_text(result: dict[str, Any]) -> str:
    return f"{result['protocol']}/{result['pool']} {result['mean']:.4g} +- {result['std']:.4g}"


def headline(name: str, task: dict[str, Any]) -> str:
    """One line: the result of the pool picked on validation (when one was picked: ``task["picked"]``)
    or every result's protocol / pool, with mean +- std over seeds and the test size."""
    sizes = task["data"]["split_sizes"]
    first = task["results"][0] if task["results"] else {"metric": "", "unit": ""}
    picked = task.get("picked")
    if picked is not None:
        chosen = next(r for r in task["results"] if r["pool"] == picked["pool"])
        others = "; ".join(f"{r['pool']} val {r['val_mean']:.4g}, test {r['mean']:.4g}"
                           for r in task["results"] if r is not chosen)
        body = (f"{_result_text(chosen)} (pool picked on validation: val {chosen['val_mean']:.4g}; "
                f"the others: {others})")
    else:
        body = "; ".join(_result_text(r) for r in task["results"])
    return (f"{name}: {first['metric']} ({first['unit']}) {body} "
            f"(final epoch, mean +- std over seeds; test n={sizes['test']})")


def pick_pool(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """When ``results`` hold several feature pools: the one scoring best on validation, as the study
    picks it (:func:`pacofr.eval.report.pick_by_val`), as ``{pool, by, mean, std, val_mean}``; None
    with a single pool or no validation score (then every result is reported)."""
    from pacofr.eval.report import pick_by_val

    if len({r["pool"] for r in results}) < 2:
        return None
    best = pick_by_val(results)
    if best is None:
        return None
    return {"pool": best["pool"], "by": "validation", **{k: best[k] for k in ("mean", "std", "val_mean")}}


def run_protocol(protocol: str, extractor: Extractor, args: argparse.Namespace, context: TaskContext,
                 **plan_args: Any) -> dict[str, Any]:
    """Evaluate ``extractor`` on ``--data`` with one protocol (the common code path). With several
    feature pools, the one picked on validation is the result (``picked``); every pool's result is
    kept in ``results``."""
    from pacofr.eval.evaluate import EvalPlan, evaluate_sets

    data = open_user_data(args, context)
    pools = None if args.pool is None else (args.pool,)
    plan = EvalPlan(protocols=(protocol,), pools=pools, device=context.device, batch_size=context.batch_size,
                    **plan_args)
    try:
        task = evaluate_sets(extractor, [(args.data, data)], plan)[args.data]
    except ValueError as err:
        raise ValueError(f"--data {args.data}: {err}") from err
    picked = pick_pool(task["results"])
    if picked is not None:
        task = {**task, "picked": picked}
    return {**task, "headline": headline(protocol, task)}


def _pool_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--pool", choices=POOLS, default=default,
                        help="encoder features: the class token, the mean of the patch tokens, both, or the patch "
                             "tokens on their grid (default: cls and mean for labels, tokens for landmarks, the "
                             "one scoring best on validation reported as the result); a baseline has its one "
                             "descriptor")


def _probe_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    _pool_argument(parser, None)
    parser.add_argument("--epochs", type=positive_int, default=100, help="epochs of the linear classifier")
    parser.add_argument("--lr", type=float_grid, default=(1e-2,), help="Adam learning rates, picked on val")
    parser.add_argument("--l2", type=float_grid, default=(1e-5, 1e-4, 1e-3, 1e-2),
                        help="L2 penalties of the classifier, picked on val")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="classifier mini-batch (larger on large sets: at most 20 batches an epoch)")


def _run_probe(extractor: Extractor, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
    from pacofr.eval.probe_protocols import ProbeConfig

    if min(args.lr) <= 0:
        raise ValueError(f"--lr values must be > 0, got {args.lr}")
    probe = ProbeConfig(seeds=context.seeds, probe_epochs=args.epochs, probe_lrs=args.lr, probe_l2s=args.l2,
                        probe_batch_size=args.batch_size)
    return run_protocol("linear", extractor, args, context, probe=probe, finetune=None)


def _knn_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    _pool_argument(parser, None)
    parser.add_argument("--k", type=positive_int, default=20, help="neighbours (cosine similarity)")


def _run_knn(extractor: Extractor, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
    from pacofr.eval.probe_protocols import ProbeConfig

    return run_protocol("knn", extractor, args, context, probe=ProbeConfig(seeds=context.seeds, knn_k=args.k),
                        finetune=None)


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="features the head reads (landmarks always use tokens)")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimiser steps of the fine-tune")
    parser.add_argument("--epochs", type=positive_int, default=None, help="passes over train instead of --steps")
    parser.add_argument("--lr", type=float_grid, default=(2e-4, 1e-3),
                        help="encoder learning rates (the head's is 10x), picked on val")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="fine-tuning mini-batch")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips of training images")


def _run_finetune(extractor: Extractor, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
    from pacofr.eval.finetune import FinetuneConfig

    if extractor.encoder is None:
        raise ValueError(f"--checkpoint: {extractor.name} is a baseline; only an encoder can be fine-tuned")
    if min(args.lr) <= 0:
        raise ValueError(f"--lr values must be > 0, got {args.lr}")
    cfg = FinetuneConfig(steps=args.steps, epochs=args.epochs, lrs=args.lr, batch_size=args.batch_size,
                         flip=not args.no_flip, seeds=context.seeds)
    return run_protocol("finetune", extractor, args, context, finetune=cfg, finetune_pool=args.pool)


LINEAR_PROBE = register(EvalTask(
    name="linear-probe", help="linear head on frozen, standardised features (ridge for numbers), tuned on val",
    add_arguments=_probe_arguments, run=_run_probe))
KNN = register(EvalTask(
    name="knn", help="cosine k-NN on frozen features", add_arguments=_knn_arguments, run=_run_knn))
FINETUNE = register(EvalTask(
    name="finetune", help="short full fine-tune of the encoder with a linear head, lr tuned on val",
    add_arguments=_finetune_arguments, run=_run_finetune))
