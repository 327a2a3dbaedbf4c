"""The classification tasks of ``pacofr eval``: ``linear-probe`` and ``finetune``.

Only argument parsing lives here (imported when the command line is built); the work is done by
:mod:`pacofr.eval.evaluate`, imported when a task runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pacofr.eval.tasks import EvalTask, TaskContext, register

if TYPE_CHECKING:
    from pacofr.eval.encoders import LoadedEncoder

POOL_CHOICES = ("cls", "mean", "cls+mean")  # = pacofr.eval.features.POOLS (kept import-free here)
DATA_HELP = ("labelled images: a folder with one sub-folder per class, a CSV with 'path,label' "
             "(or 'path,labels' with ';'-separated attributes), or proxy:lfw-face-vs-nonface (a "
             "face/non-face PROXY from scikit-image's LFW subset: no identity labels exist offline)")


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--pool", choices=POOL_CHOICES, default="cls",
                        help="features: the class token, the mean of the patch tokens, or both concatenated")


def _open_data(args: argparse.Namespace, context: TaskContext) -> Any:
    """The labelled set of ``--data``, checked to give honest numbers (errors name ``--data``)."""
    from pacofr.eval.evaluate import check_labelled
    from pacofr.eval.proxy import open_labelled

    try:
        data = open_labelled(args.data, context.scratch)
        check_labelled(data)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--data {args.data}: {err}") from err
    return data


def _headline(kind: str, result: dict[str, Any]) -> str:
    return (f"{kind}: final-epoch test accuracy {result['final_test_mean']:.4f} +- {result['final_test_std']:.4f} "
            f"(std over {len(result['seeds'])} seeds; test n={result['split_sizes']['test']}); "
            f"best-val extra {result['best_val_mean']:.4f}")


def _probe_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=100, help="epochs of the linear classifier")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate of the classifier")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="classifier mini-batch")


def _run_probe(encoder: LoadedEncoder, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
    from pacofr.eval.evaluate import describe_data, linear_probe_encoder
    from pacofr.eval.linear_probe import ProbeConfig

    data = _open_data(args, context)
    cfg = ProbeConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seeds=context.seeds)
    result = linear_probe_encoder(encoder, data, pool=args.pool, cfg=cfg, device=context.device)
    return {"data": describe_data(data, args.data), "pool": args.pool, "result": result,
            "headline": _headline("linear probe", result)}


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=10, help="fine-tuning epochs")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate of the encoder")
    parser.add_argument("--head-lr", type=positive_float, default=1e-3, help="AdamW learning rate of the head")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="fine-tuning mini-batch")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips of training images")


def _run_finetune(encoder: LoadedEncoder, args: argparse.Namespace, context: TaskContext) -> dict[str, Any]:
    from pacofr.eval.evaluate import describe_data, finetune_encoder
    from pacofr.eval.finetune import FinetuneConfig

    data = _open_data(args, context)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                         flip=not args.no_flip, seeds=context.seeds)
    result = finetune_encoder(encoder, data, pool=args.pool, cfg=cfg, device=context.device)
    return {"data": describe_data(data, args.data), "pool": args.pool, "result": result,
            "headline": _headline("fine-tune", result)}


LINEAR_PROBE = register(EvalTask(
    name="linear-probe", help="linear classifier on frozen, standardised encoder features",
    add_arguments=_probe_arguments, run=_run_probe))
FINETUNE = register(EvalTask(
    name="finetune", help="short full fine-tune of the encoder with a linear head",
    add_arguments=_finetune_arguments, run=_run_finetune))
