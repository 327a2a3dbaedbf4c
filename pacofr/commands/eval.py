"""``pacofr eval``: evaluate encoders and classic baselines on labelled faces; the pre-training study.

Examples::

    pacofr eval linear-probe --checkpoint runs/demo --data my_faces/ --out eval/probe
    pacofr eval linear-probe --checkpoint runs/demo --data utk/labels.csv --images utk/images.zip \\
        --label age --regression --unit years --out eval/age
    pacofr eval knn --checkpoint baseline:hog --data faces.npz --out eval/hog
    pacofr eval finetune --checkpoint runs/demo/export --data faces.csv --out eval/ft
    pacofr eval fer2013 --checkpoint runs/demo --data-root /work/shared/data --out eval/fer
    pacofr eval faces --checkpoint runs/a --checkpoint random:demo --baselines hog,raw \\
        --data-root /work/shared/data --out eval/faces
    pacofr eval study --config study_cpu --variant paco --variant mae --data-root /work/shared/data \\
        --work runs/study --out docs/eval
    pacofr eval study --pretrain-only --variant paco --variant mae --data-root /work/shared/data \\
        --work runs/study --out runs/study

Every task writes ``OUT/<task>.json``: final-epoch test scores (mean and std over seeds), the
hyper-parameters picked on val, the split, the row's source, versions and date. ``faces`` and
``study`` also write a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from pacofr.eval.face_protocol_commands import add_plan_arguments, data_root, plan_from_args
from pacofr.eval.user_data_commands import positive_int


CHECKPOINT_HELP = ("what to evaluate: a pacofr training checkpoint (step_* folder, checkpoints folder or run "
                   "folder: its newest), a folder written by `pacofr export`, random:PRESET (a freshly "
                   "initialised encoder of a model preset: tiny, demo, vit_tiny, vit_small, vit_base), or "
                   "baseline:raw|pca|hog|lbp (a classic descriptor)")


def _common_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (0, 1, ...) to average over")
    sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sub.add_argument("--batch-size-features", type=positive_int, default=64, dest="feature_batch",
                     help="images per feature-extraction batch (memory is bounded by it)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pacofr.eval.task_registry import all_tasks

    parser = subparsers.add_parser(
        "eval", help="evaluate encoders and baselines: probes, k-NN, fine-tune, face tasks, pre-training study",
        description="Evaluate encoders (and classic baselines) on labelled faces. Reported numbers are final-epoch "
                    "test scores (mean and std over seeds); hyper-parameters are picked on a validation split.")
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for task in all_tasks().values():
        sub = tasks.add_parser(task.name, help=task.help, description=task.help)
        sub.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        sub.add_argument("--out", required=True, help=f"output folder (writes {task.name.replace('-', '_')}.json)")
        sub.add_argument("--teacher", action="store_true",
                         help="evaluate the EMA teacher of a training checkpoint instead of the student")
        sub.add_argument("--init-seed", type=int, default=0, help="seed of random:PRESET initialisation")
        _common_arguments(sub)
        task.add_arguments(sub)
        sub.set_defaults(func=run_task, eval_task=task.name)
    _add_faces_parser(tasks)
    _add_study_parser(tasks)


def _add_faces_parser(tasks: argparse._SubParsersAction) -> None:
    sub = tasks.add_parser("faces", help="several encoders and baselines on the face tasks: one table",
                           description="Evaluates every --checkpoint and every baseline on the face tasks with "
                                       "fixed protocols; writes faces.json and faces.md into --out.")
    sub.add_argument("--checkpoint", action="append", default=[], help=CHECKPOINT_HELP + " (repeatable)")
    sub.add_argument("--baselines", default="raw,pca,hog,lbp", help="comma-separated baselines ('' for none)")
    sub.add_argument("--tasks", default="all", help="'all' or comma-separated face tasks")
    sub.add_argument("--out", required=True, help="output folder for faces.json and faces.md")
    _common_arguments(sub)
    add_plan_arguments(sub)
    sub.set_defaults(func=run_faces, eval_task="faces")


def _add_study_parser(tasks: argparse._SubParsersAction) -> None:
    sub = tasks.add_parser(
        "study", aliases=["compare"],
        help="pre-train named variants (peer methods or an ablation grid) at equal steps and equal compute; "
             "evaluate them, random init and baselines on every face task (alias: compare)",
        description="Pre-trains every --variant on the unlabelled train images of UTKFace and FER-2013 (under "
                    "--data-root) at equal steps and, after the first, at the first one's CPU seconds; evaluates "
                    "them, random init and the baselines on the face tasks; writes study.json, study.md and "
                    "study.png into --out.")
    sub.add_argument("--config", default="study_cpu", help="pre-training config: a packaged preset or a YAML file")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="pre-training config override shared by every variant (repeatable)")
    sub.add_argument("--variant", action="append", default=[], metavar="[NAME=]METHOD[:KEY=VALUE,...]",
                     help="a pre-training variant, e.g. paco, mae, 'M1=paco:model.num_candidates=1' (repeatable; "
                          "default: paco and mae)")
    sub.add_argument("--steps", type=positive_int, default=None,
                     help="equal-steps budget (default: the config's train.total_steps)")
    sub.add_argument("--no-equal-compute", action="store_true", help="skip the equal-compute runs")
    sub.add_argument("--pretrain-only", action="store_true",
                     help="pre-train the variants (equal steps and equal compute as above) and evaluate nothing: "
                          "writes the run list, pretraining.json, into --out; a later study with the same --work "
                          "reuses the runs")
    sub.add_argument("--compute-tolerance", type=float, default=0.10, metavar="FRACTION",
                     help="a variant whose step count at the compute budget is within this fraction of its "
                          "equal-steps count is not run again (default 0.10; CPU seconds per step vary by "
                          "several percent between runs; 0 trains every variant again)")
    sub.add_argument("--baselines", default="raw,pca,hog,lbp", help="comma-separated baselines ('' for none)")
    sub.add_argument("--tasks", default="all", help="'all' or comma-separated face tasks")
    sub.add_argument("--work", required=True, help="folder for the pre-training runs and finished rows (reused when "
                                                   "the study is run again)")
    sub.add_argument("--out", required=True, help="output folder for study.json, study.md, study.png")
    _common_arguments(sub)
    add_plan_arguments(sub)
    sub.set_defaults(func=run_study, eval_task="study")


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return choice


def _open(spec: str, **kwargs: Any) -> Any:
    from pacofr.eval.extractors import open_extractor

    try:
        return open_extractor(spec, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise ValueError(f"--checkpoint {spec}: {err}") from err


def run_task(args: argparse.Namespace) -> int:
    """One task on one encoder: prints the headline, for classification the majority-class and chance
    scores (naming a collapsed result), and writes the JSON. Errors propagate to :func:`pacofr.cli.main`."""
    from pacofr.eval.report import class_references, environment, reference_line, write_json
    from pacofr.eval.task_registry import TaskContext, get_task

    task = get_task(args.eval_task)
    device = _device(args.device)
    extractor = _open(args.checkpoint, teacher=args.teacher, init_seed=args.init_seed)
    with tempfile.TemporaryDirectory(prefix="pacofr-eval-") as scratch:
        context = TaskContext(seeds=tuple(range(args.seeds)), device=device, scratch=Path(scratch),
                              batch_size=args.feature_batch)
        result = task.run(extractor, args, context)
    references = class_references(result)
    payload = {"task": task.name, "row": extractor.describe(), "environment": environment(device), **result,
               **({"references": references} if references else {})}
    path = write_json(Path(args.out) / f"{task.name.replace('-', '_')}.json", payload)
    print(result["headline"])
    line = reference_line(task.name, result)
    if line:
        print(line)
    print(f"written {path}")
    return 0


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--{what}: unknown {unknown}; known: {list(known)}")
    return names


def run_faces(args: argparse.Namespace) -> int:
    from pacofr.eval.baselines import BASELINE_TITLES, BASELINES, require_dependencies
    from pacofr.eval.extractors import BaselineExtractor
    from pacofr.eval.face_protocols import FACE_TASKS, load_tasks, parse_task_list
    from pacofr.eval.grid import Row, evaluate_grid, plan_dict
    from pacofr.eval.report import environment, grid_tables, metric_line, write_json

    device = _device(args.device)
    baselines = _names(args.baselines, BASELINES, "baselines")
    require_dependencies(baselines)  # before any work: a missing scikit-image is one line naming the extra
    names = parse_task_list(args.tasks)
    if not args.checkpoint and not baselines:
        raise ValueError("--checkpoint / --baselines: nothing to evaluate")
    plan = plan_from_args(args, tuple(range(args.seeds)), device, args.feature_batch)
    rows = [Row(BASELINE_TITLES[b], lambda b=b: BaselineExtractor(b), kind="baseline") for b in baselines]
    for spec in args.checkpoint:
        extractor = _open(spec)  # fails early on a bad spec; opened again when its row runs
        name = extractor.name if all(extractor.name != row.name for row in rows) else spec
        rows.append(Row(name, lambda s=spec: _open(s), kind="encoder" if extractor.encoder is not None
                        else "baseline", info={"spec": spec}))
        del extractor
    try:
        sets = load_tasks(names, data_root(args))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--data-root {args.data_root}: {err}") from err
    # each finished row is written to OUT/rows/ as it finishes (a run stopped later keeps it; a rerun reuses it)
    grid = evaluate_grid(rows, sets, plan, cache_dir=Path(args.out) / "rows")
    titles = {name: FACE_TASKS[name].title for name in names}
    payload = {"environment": environment(device), "plan": plan_dict(plan), "tasks": list(names),
               "task_protocols": {n: d.protocol for n, d in sets}, "rows": grid}
    out = Path(args.out)
    write_json(out / "faces.json", payload)
    report = "\n".join([metric_line(grid, names, titles), "", *grid_tables(grid, names, titles)])
    (out / "faces.md").write_text(report)
    print(report)
    print(f"written {out / 'faces.json'}, faces.md")
    return 0


def run_study(args: argparse.Namespace) -> int:
    from pacofr.eval.baselines import BASELINES
    from pacofr.eval.face_protocols import parse_task_list
    from pacofr.eval.study import PRETRAINING_FILE, run_pretraining_only
    from pacofr.eval.study import run_study as study
    from pacofr.eval.study_variants import StudyConfig, parse_variant, pretrain_config

    device = _device(args.device)
    variants = tuple(parse_variant(v) for v in (args.variant or ["paco", "mae"]))
    cfg = StudyConfig(data_root=data_root(args), config=args.config, overrides=tuple(args.overrides),
                      variants=variants, steps=args.steps, equal_compute=not args.no_equal_compute,
                      compute_tolerance=args.compute_tolerance,
                      tasks=tuple(parse_task_list(args.tasks)), baselines=_names(args.baselines, BASELINES,
                                                                                   "baselines"),
                      plan=plan_from_args(args, tuple(range(args.seeds)), device, args.feature_batch))
    for variant in variants:  # a bad config or override fails before any pre-training
        try:
            pretrain_config(cfg, variant, cfg.steps, Path(args.work) / "check")
        except ValueError as err:
            raise ValueError(f"--config {args.config} / --set / --variant {variant.name}: {err}") from err
    if args.pretrain_only:
        listing = run_pretraining_only(cfg, args.out, args.work)
        for run in listing["pretraining"]:
            print(f"{run['variant']['name']} ({run['budget']}): {run['steps']} steps, {run['cpu_s']} CPU s, "
                  f"{run['checkpoint']}")
        print(f"written {Path(args.out) / PRETRAINING_FILE} ({len(listing['pretraining'])} runs, nothing evaluated)")
        return 0
    result = study(cfg, args.out, args.work)
    print(f"written {Path(args.out) / 'study.json'}, study.md, study.png "
          f"({len(result['rows'])} rows, {len(result['tasks'])} tasks)")
    return 0
