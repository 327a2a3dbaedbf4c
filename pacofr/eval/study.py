"""The pre-training study: named variants pre-trained at equal steps and at equal compute, every row
(baselines, random init, each pre-trained encoder) evaluated on every face task by one code path.

* **Pre-training set**: the unlabelled *train* images (train and val splits, never test) of
  :data:`~pacofr.eval.study_variants.PRETRAIN_TASKS` (UTKFace and FER-2013), read where they are and used as the face crops
  they are (:class:`pacofr.data.datasets.CroppedFaceDataset`, template region map).
* **Variants** (:func:`pacofr.eval.study_variants.parse_variant`): ``[NAME=]METHOD[:KEY=VALUE,...]``, e.g. ``paco``, ``mae``,
  ``M1=paco:model.num_candidates=1``; every variant shares the study config and differs only in
  ``model.method`` and its own overrides. New ablations or peer methods are new rows, not code.
* **Equal steps**: every variant trains ``steps`` optimiser steps (the lr schedule spans exactly
  that, ``train.total_steps``). **Equal compute**: the first variant's process CPU seconds are the
  budget; every other variant trains again for ``round(steps x budget / its CPU seconds)`` steps,
  its CPU cost per step measured by its own equal-steps run; a variant whose step count at the budget
  is within ``compute_tolerance`` (default 10 %; one computation's CPU seconds
  varied by 7-34 % between runs on a shared 2-core machine) of its equal-steps count is not run again: its
  equal-steps run stands for equal compute (budget ``equal steps ~ compute``). Process CPU time (``time.process_time``:
  training, data loading, everything the process does) is used rather than wall time, which other
  jobs on a shared machine inflate; both are recorded, with the load average, per run.
* **FLOPs** per image of a training step (forward + backward, each phase) and of the encoder's
  forward pass are counted with ``torch.utils.flop_counter``.

:func:`run_study` writes ``study.json``, ``study.md`` and ``study.png`` (score vs pre-training CPU
seconds); :func:`run_pretraining_only` pre-trains the same runs and writes only their list,
``pretraining.json``, evaluating nothing. Finished runs and rows are kept in the work folder and reused when the study is run
again with the same settings.

The parts: the variants and the study's settings (:mod:`pacofr.eval.study_variants`), pre-training
under the compute budget and FLOPs (:mod:`pacofr.eval.compute_budget`), the markdown page
(:mod:`pacofr.eval.study_report`); this module joins them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pacofr.eval.baselines import BASELINE_TITLES
from pacofr.eval.compute_budget import pretrain_all
from pacofr.eval.extractors import BaselineExtractor, EncoderExtractor
from pacofr.eval.face_protocols import FACE_TASKS, load_tasks
from pacofr.eval.grid import Row, evaluate_grid, plan_dict
from pacofr.eval.report import environment, score_vs_time_plot, write_json
from pacofr.eval.study_report import caveats, markdown_report, row_label
from pacofr.eval.study_variants import PRETRAIN_TASKS, StudyConfig, pretrain_config

logger = logging.getLogger(__name__)

RESULT_FILES = ("study.json", "study.md", "study.png")
PRETRAINING_FILE = "pretraining.json"  # the run list of a pre-training-only study


def pretraining_images(sets: Sequence[tuple[str, Any]]) -> tuple[Any, dict[str, int]]:
    """The train and val images of ``sets`` (each image set once), joined; and their counts."""
    from pacofr.data.image_sets import ConcatImages, SubsetImages

    parts, prefixes, counts, seen = [], [], {}, set()
    for name, data in sets:
        if id(data.images) in seen:
            continue
        seen.add(id(data.images))
        rows = sorted(data.indices("train") + data.indices("val"))
        parts.append(SubsetImages(data.images, rows))
        prefixes.append(f"{name}/")
        counts[name] = len(rows)
    return ConcatImages(parts, prefixes), counts


def study_rows(cfg: StudyConfig, runs: list[dict[str, Any]]) -> list[Row]:
    """Baselines, random init (the common start of every run) and every pre-trained encoder."""
    from pacofr.eval.encoders import checkpoint_encoder, random_encoder
    from pacofr.train.config import PretrainConfig

    rows = [Row(BASELINE_TITLES[b], lambda b=b: BaselineExtractor(b), kind="baseline") for b in cfg.baselines]
    first = PretrainConfig.from_dict(runs[0]["config"])
    names = [v.name for v in cfg.variants]
    rows.append(Row("random init", lambda: EncoderExtractor(random_encoder(first.model, seed=first.train.seed)),
                    info={"cpu_s": 0.0, "steps": 0, "curves": names}))
    for run in runs:
        label = row_label(run)
        info = {k: run[k] for k in ("budget", "steps", "epochs", "cpu_s", "wall_s", "gflops_per_image")}
        rows.append(Row(label, lambda path=run["checkpoint"]: EncoderExtractor(checkpoint_encoder(path)),
                        info={**info, "curves": [run["variant"]["name"]]}))
    return rows


def _pretrain_variants(cfg: StudyConfig, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pre-train every variant under the compute budget on the study's pre-training set (finished
    runs in ``work`` are reused); the run records and what describes the set and the encoder."""
    from pacofr.data.datasets import CroppedFaceDataset

    pre_sets = load_tasks(list(PRETRAIN_TASKS), cfg.data_root)
    images, counts = pretraining_images(pre_sets)
    model = pretrain_config(cfg, cfg.variants[0], cfg.steps, work / "probe").model
    # uint8 items: the trainer augments whole batches on the training device (data.augment)
    dataset = CroppedFaceDataset(images, image_size=model.img_size, uint8=True)
    runs = pretrain_all(cfg, work, dataset)
    header = {
        "config": cfg.config, "overrides": list(cfg.overrides), "variants": [asdict(v) for v in cfg.variants],
        "data_root": cfg.data_root, "pretraining_images": len(images), "pretraining_counts": counts,
        "encoder": (f"ViT {model.img_size} px, patch {model.patch_size}, {model.embed_dim}-d, {model.depth} blocks, "
                    f"{model.num_heads} heads (a timm VisionTransformer with these arguments)"),
        "img_size": model.img_size, "compute_tolerance": cfg.compute_tolerance,
    }
    return runs, header


def run_pretraining_only(cfg: StudyConfig, out_dir: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """Pre-train every variant as :func:`run_study` does and evaluate nothing: write the run list
    (``pretraining.json``: each run's record with its checkpoint, steps, budget and CPU seconds) to
    ``out_dir``; return its data. A later study with the same ``work_dir`` reuses these runs."""
    start = time.perf_counter()
    runs, header = _pretrain_variants(cfg, Path(work_dir))
    listing = {"title": f"Pre-training runs: {', '.join(v.name for v in cfg.variants)} (no evaluation)",
               "environment": environment(cfg.plan.device), **header, "pretraining": runs,
               "wall_s": round(time.perf_counter() - start, 1)}
    write_json(Path(out_dir) / PRETRAINING_FILE, listing)
    logger.info("pre-training run list written to %s", Path(out_dir) / PRETRAINING_FILE)
    return listing


def run_study(cfg: StudyConfig, out_dir: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """Pre-train, evaluate every row on every task, write the report files; return the JSON data."""
    start = time.perf_counter()
    out_dir, work = Path(out_dir), Path(work_dir)
    runs, header = _pretrain_variants(cfg, work)
    sets = load_tasks(list(cfg.tasks), cfg.data_root)
    grid = evaluate_grid(study_rows(cfg, runs), sets, cfg.plan, cache_dir=work / "rows")
    titles = {name: FACE_TASKS[name].title for name in cfg.tasks}
    study = {
        "title": f"Pre-training study: {', '.join(v.name for v in cfg.variants)} vs random init and classic baselines",
        "environment": environment(cfg.plan.device), **{k: v for k, v in header.items() if k != "img_size"},
        "pretraining": runs, "plan": plan_dict(cfg.plan), "tasks": list(cfg.tasks), "task_titles": titles,
        "task_protocols": {name: data.protocol for name, data in sets},
        "split_sizes": {name: data.split_sizes() for name, data in sets},
        "rows": grid, "caveats": caveats(runs, header["img_size"]), "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(out_dir / RESULT_FILES[0], study)
    (out_dir / RESULT_FILES[1]).write_text(markdown_report(study))
    score_vs_time_plot(grid, list(cfg.tasks), titles, out_dir / RESULT_FILES[2],
                       "linear probe (mean-pooled patch tokens; tokens for landmarks) vs pre-training CPU seconds")
    logger.info("study written to %s", out_dir)
    return study
