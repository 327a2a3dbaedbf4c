"""``pacofr eval``: evaluate encoders (linear probe, fine-tune) and compare pre-training methods.

Examples::

    pacofr eval linear-probe --checkpoint runs/demo --data proxy:lfw-face-vs-nonface --out runs/demo/eval
    pacofr eval finetune --checkpoint runs/demo/export --data faces.csv --epochs 10 --out eval/ft
    pacofr eval linear-probe --checkpoint random:demo --data my_faces/ --out eval/random
    pacofr eval compare --config demo --epochs 30 --out docs/eval

Every task writes ``OUT/<task>.json``: the final-epoch test accuracy (mean and std over seeds),
the best-validation epoch as an extra, the split, the encoder source, versions and date.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pacofr.eval.classification import DATA_HELP, POOL_CHOICES, positive_int

if TYPE_CHECKING:
    from pacofr.eval.compare import CompareConfig

logger = logging.getLogger(__name__)

CHECKPOINT_HELP = ("the encoder: a pacofr training checkpoint (step_* folder, checkpoints folder or run "
                   "folder: its newest), a folder written by `pacofr export`, or random:PRESET (a freshly "
                   "initialised encoder of a model preset: tiny, demo, vit_tiny, vit_small, vit_base)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pacofr.eval.tasks import all_tasks

    parser = subparsers.add_parser(
        "eval", help="evaluate encoders: linear probe, fine-tune, method comparison",
        description="Evaluate pre-trained encoders on labelled images. Reported numbers are final-epoch test "
                    "accuracies (mean and std over seeds); the best validation epoch is an extra.")
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for task in all_tasks().values():
        sub = tasks.add_parser(task.name, help=task.help, description=task.help)
        sub.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        sub.add_argument("--out", required=True, help=f"output folder (writes {task.name.replace('-', '_')}.json)")
        sub.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (0, 1, ...) to average over")
        sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        sub.add_argument("--teacher", action="store_true",
                         help="evaluate the EMA teacher of a training checkpoint instead of the student")
        sub.add_argument("--init-seed", type=int, default=0, help="seed of random:PRESET initialisation")
        task.add_arguments(sub)
        sub.set_defaults(func=run_task, eval_task=task.name)
    _add_compare_parser(tasks)


def _add_compare_parser(tasks: argparse._SubParsersAction) -> None:
    sub = tasks.add_parser(
        "compare", help="pre-train PaCo-FR and the MAE-face control at equal budget, probe both and random init",
        description="Pre-trains every method with the same config (data, epochs, steps, batch, resolution, "
                    "encoder, seed), then runs the same linear probe (and optional fine-tune) on each encoder and "
                    "on the random initialisation; writes compare.json, compare.md and compare.png into --out.")
    sub.add_argument("--config", "--preset", dest="config", default="demo",
                     help="pre-training config: a packaged preset (demo, ...) or a YAML file")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="pre-training config override shared by every method (repeatable)")
    sub.add_argument("--epochs", type=positive_int, default=None, help="pre-training epochs (the budget)")
    sub.add_argument("--max-steps", type=positive_int, default=None, help="stop pre-training after this many steps")
    sub.add_argument("--methods", default="paco,mae", help="comma-separated methods to pre-train (paco, mae)")
    sub.add_argument("--data", default="proxy:lfw-face-vs-nonface", help=DATA_HELP)
    sub.add_argument("--pool", choices=POOL_CHOICES, default="cls", help="probe features")
    sub.add_argument("--seeds", type=positive_int, default=3, help="probe / fine-tune seeds")
    sub.add_argument("--probe-epochs", type=positive_int, default=100, help="linear-probe epochs")
    sub.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs (0: no fine-tune)")
    sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of the evaluation")
    sub.add_argument("--work", default=None,
                     help="folder for the pre-training runs (kept); default: a temporary folder, deleted")
    sub.add_argument("--out", required=True, help="output folder for compare.json, compare.md, compare.png")
    sub.set_defaults(func=run_compare, eval_task="compare")


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return choice


def run_task(args: argparse.Namespace) -> int:
    from pacofr.eval.encoders import load_encoder
    from pacofr.eval.report import environment, write_json
    from pacofr.eval.tasks import TaskContext, get_task

    task = get_task(args.eval_task)
    try:
        device = _device(args.device)
        try:
            encoder = load_encoder(args.checkpoint, teacher=args.teacher, seed=args.init_seed)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--checkpoint {args.checkpoint}: {err}") from err
        with tempfile.TemporaryDirectory(prefix="pacofr-eval-") as scratch:
            context = TaskContext(seeds=tuple(range(args.seeds)), device=device, scratch=Path(scratch))
            result = task.run(encoder, args, context)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    payload = {"task": task.name, "encoder": {**encoder.source, "img_size": encoder.img_size,
                                              "mean": list(encoder.mean), "std": list(encoder.std)},
               "environment": environment(device), **result}
    path = write_json(Path(args.out) / f"{task.name.replace('-', '_')}.json", payload)
    print(result["headline"])
    print(f"written {path}")
    return 0


def _check_compare_inputs(cfg: CompareConfig, scratch: Path) -> None:
    """Fail before any pre-training on a bad config, override or data source, naming the argument."""
    from pacofr.eval.compare import pretrain_config
    from pacofr.eval.evaluate import check_labelled
    from pacofr.eval.proxy import open_labelled

    try:
        for method in cfg.methods:
            pretrain_config(cfg, method, scratch / method)
    except ValueError as err:
        raise ValueError(f"--config {cfg.config} / --set / --epochs / --max-steps: {err}") from err
    try:
        check_labelled(open_labelled(cfg.data, scratch / "data"))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--data {cfg.data}: {err}") from err


def run_compare(args: argparse.Namespace) -> int:
    from pacofr.eval.compare import METHOD_NAMES, CompareConfig
    from pacofr.eval.compare import run_compare as compare
    from pacofr.eval.finetune import FinetuneConfig
    from pacofr.eval.linear_probe import ProbeConfig

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        if not methods or any(m not in METHOD_NAMES for m in methods):
            raise ValueError(f"--methods must list some of {tuple(METHOD_NAMES)} separated by commas, got {args.methods!r}")
        if args.finetune_epochs < 0:
            raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
        seeds = tuple(range(args.seeds))
        cfg = CompareConfig(config=args.config, overrides=tuple(args.overrides), epochs=args.epochs,
                            max_steps=args.max_steps, methods=methods, data=args.data, pool=args.pool,
                            probe=ProbeConfig(epochs=args.probe_epochs, seeds=seeds),
                            finetune=FinetuneConfig(epochs=args.finetune_epochs, seeds=seeds) if args.finetune_epochs else None,
                            device=_device(args.device))
        with tempfile.TemporaryDirectory(prefix="pacofr-compare-") as scratch:
            _check_compare_inputs(cfg, Path(scratch))
            result = compare(cfg, args.out, args.work or Path(scratch) / "runs")
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    for enc in result["encoders"]:
        probe = enc["linear_probe"]
        line = f"{enc['name']:<12} linear probe {probe['final_test_mean']:.4f} +- {probe['final_test_std']:.4f}"
        if enc.get("finetune"):
            line += f"   fine-tune {enc['finetune']['final_test_mean']:.4f} +- {enc['finetune']['final_test_std']:.4f}"
        print(line)
    print(f"written {Path(args.out) / 'compare.json'}, compare.md, compare.png")
    return 0
