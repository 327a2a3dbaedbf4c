"""The pre-training study: named variants pre-trained at equal steps and at equal compute, every row
(baselines, random init, each pre-trained encoder) evaluated on every face task by one code path.

* **Pre-training set**: the unlabelled *train* images (train and val splits, never test) of
  :data:`PRETRAIN_TASKS` (UTKFace and FER-2013), read where they are and used as the face crops
  they are (:class:`pacofr.data.datasets.CroppedFaceDataset`, template region map).
* **Variants** (:func:`parse_variant`): ``[NAME=]METHOD[:KEY=VALUE,...]``, e.g. ``paco``, ``mae``,
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
seconds). Finished runs and rows are kept in the work folder and reused when the study is run
again with the same settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pacofr.eval.baselines import BASELINE_TITLES, BASELINES
from pacofr.eval.evaluate import EvalPlan
from pacofr.eval.extractors import BaselineExtractor, EncoderExtractor
from pacofr.eval.face_tasks import FACE_TASKS, load_tasks
from pacofr.eval.grid import Row, evaluate_grid, plan_dict
from pacofr.eval.report import environment, grid_tables, metric_line, score_vs_time_plot, summary_table, write_json

logger = logging.getLogger(__name__)

METHOD_NAMES = {"paco": "PaCo-FR", "mae": "MAE-face", "mcf": "MCF-style", "fra": "FRA-style"}
PRETRAIN_TASKS = ("utkface-gender", "fer2013")
RESULT_FILES = ("study.json", "study.md", "study.png")
RUN_RECORD = "study_run.json"
MATCHED_BUDGET = "equal steps ~ compute"  # an equal-steps run within compute_tolerance of the compute budget
_QUIET = ("train.progress=false", "train.viz_every=0", "train.num_viz=0", "train.ckpt_every=0",
          "train.keep_last=1")


@dataclass(frozen=True)
class Variant:
    """A named pre-training: ``method`` plus config ``overrides`` (``KEY=VALUE``)."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


def parse_variant(text: str) -> Variant:
    """``[NAME=]METHOD[:KEY=VALUE,KEY=VALUE...]`` (values may not contain commas) as a :class:`Variant`."""
    spec = text.strip()
    head, _, rest = spec.partition(":")
    name, eq, method = head.rpartition("=")
    if not eq:
        name, method = "", head
    method = method.strip()
    if method not in METHOD_NAMES:
        raise ValueError(f"variant {text!r}: the method must be one of {tuple(METHOD_NAMES)} "
                         "(format [NAME=]METHOD[:KEY=VALUE,...])")
    overrides = tuple(item.strip() for item in rest.split(",") if item.strip())
    for item in overrides:
        if "=" not in item or item.startswith("model.method"):
            raise ValueError(f"variant {text!r}: overrides must be KEY=VALUE (and not model.method), got {item!r}")
    return Variant(name.strip() or (METHOD_NAMES[method] if not overrides else spec), method, overrides)


@dataclass
class StudyConfig:
    """What :func:`run_study` pre-trains and evaluates.

    ``config`` / ``overrides``: the pre-training config shared by every variant; ``steps``: the
    equal-steps budget (None: the config's ``train.total_steps``); ``equal_compute``: also run
    every variant after the first at the first one's CPU seconds, except those whose step count at that
    budget is within ``compute_tolerance`` (a fraction; 0 trains every one again) of ``steps``;
    ``tasks``: evaluated tasks;
    ``baselines``: classic rows; ``plan``: protocols and their settings.
    """

    data_root: str
    config: str = "study_cpu"
    overrides: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = (Variant("PaCo-FR", "paco"), Variant("MAE-face", "mae"))
    steps: int | None = None
    equal_compute: bool = True
    compute_tolerance: float = 0.10
    tasks: tuple[str, ...] = tuple(FACE_TASKS)
    baselines: tuple[str, ...] = BASELINES
    plan: EvalPlan = field(default_factory=EvalPlan)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("a study needs at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        unknown = [t for t in self.tasks if t not in FACE_TASKS] + [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown tasks or baselines {unknown}; tasks: {list(FACE_TASKS)}, baselines: {BASELINES}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.compute_tolerance < 1.0:
            raise ValueError(f"compute_tolerance must be a fraction in [0, 1), got {self.compute_tolerance}")


def pretrain_config(cfg: StudyConfig, variant: Variant, steps: int | None, out_dir: Path) -> Any:
    """The :class:`PretrainConfig` of ``variant`` (``steps`` None: the config's own budget)."""
    from pacofr.train.config import load_config

    overrides = [*_QUIET, *cfg.overrides, f"model.method={variant.method}", *variant.overrides,
                 "data.layout=crops", f"data.root=study: train images of {'+'.join(PRETRAIN_TASKS)} under {cfg.data_root}",
                 f"train.out_dir={out_dir}"]
    if steps is not None:
        overrides.append(f"train.total_steps={steps}")
    run_cfg = load_config(cfg.config, overrides)
    if run_cfg.train.total_steps < 1:
        raise ValueError(f"config {cfg.config} sets no train.total_steps: give the study a step budget (--steps)")
    return run_cfg


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


def last_epoch_losses(scalars: Path | None, last_step: int, steps_per_epoch: int) -> dict[str, float]:
    """Mean of every ``loss*`` column over the rows logged in the last ``steps_per_epoch`` steps."""
    from pacofr.train.metrics import ScalarCSV

    if scalars is None or not Path(scalars).exists():
        return {}
    tail = [row for row in ScalarCSV(scalars).read() if int(row["step"]) > last_step - steps_per_epoch]
    means: dict[str, float] = {}
    for key in (tail[0].keys() if tail else ()):
        values = [float(r[key]) for r in tail if key.startswith("loss") and r.get(key)]
        if values:
            means[key] = sum(values) / len(values)
    return means


def flops_per_image(model_cfg: Any, batch: int = 4) -> dict[str, float]:
    """GFLOPs per image of a training step (forward + backward) in each phase and of the encoder's
    forward pass, counted by ``torch.utils.flop_counter`` on the torch backend (CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pacofr.models import build_model
    from pacofr.train.regions import RegionAssigner
    from pacofr.train.seeding import isolated_rng

    cfg = model_cfg.replace(backend="torch")
    with isolated_rng(0):
        model = build_model(cfg).train()
        images = torch.rand(batch, 3, cfg.img_size, cfg.img_size)
        regions = RegionAssigner(cfg)({"image": images, "landmarks": torch.zeros(batch, 5, 2)})
        out: dict[str, float] = {}
        for phase, incubation in (("train_step_incubation", True), ("train_step", False)):
            counter = FlopCounterMode(display=False)
            with counter:
                model(images, regions, incubation=incubation, generator=torch.Generator().manual_seed(0)).loss.backward()
            out[phase] = counter.get_total_flops() / batch / 1e9
            model.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.encoder.forward_features(images)
        out["encoder_forward"] = counter.get_total_flops() / batch / 1e9
    return out


def _same_config(stored: Any, run_cfg: Any) -> bool:
    """Whether a finished run's recorded config is ``run_cfg``; fields added to the config since the
    run was recorded count at their defaults (the run trained with them)."""
    from pacofr.train.config import PretrainConfig

    if not isinstance(stored, dict):
        return False
    try:
        return PretrainConfig.from_dict(stored).to_dict() == run_cfg.to_dict()
    except (ValueError, TypeError):  # a field that no longer exists, or a value it no longer takes
        return False


def _pretrain(cfg: StudyConfig, variant: Variant, steps: int | None, budget: str, work: Path,
              dataset: Any) -> dict[str, Any]:
    """Pre-train one variant (or reuse a finished identical run in ``work``); its record."""
    from pacofr.train.pretrain import run_pretraining

    out_dir = work / f"{variant.name}-{budget}".replace("/", "_").replace(" ", "_")
    run_cfg = pretrain_config(cfg, variant, steps, out_dir)
    record_path = out_dir / RUN_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if _same_config(record.get("config"), run_cfg) and Path(record["checkpoint"]).is_dir():
            logger.info("%s (%s): reusing the finished run in %s", variant.name, budget, out_dir)
            return record
    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run_pretraining(run_cfg, overwrite=True, dataset=dataset)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per_epoch = len(dataset) // (run_cfg.train.batch_size * run_cfg.train.accum_steps)
    record = {"variant": asdict(variant), "budget": budget, "steps": result.step,
              "epochs": round(result.step / max(1, per_epoch), 3), "steps_per_epoch": per_epoch,
              "images": len(dataset), "batch_size": run_cfg.train.batch_size * run_cfg.train.accum_steps,
              "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "cpu_s_per_step": cpu / max(1, result.step),
              "torch_threads": torch.get_num_threads(), "loadavg_before": list(load_before),
              "loadavg_after": list(os.getloadavg()), "checkpoint": str(result.checkpoint),
              "final_epoch_losses": last_epoch_losses(result.scalars, result.step, max(1, per_epoch)),
              "gflops_per_image": flops_per_image(run_cfg.model), "config": run_cfg.to_dict()}
    write_json(record_path, record)
    logger.info("pre-trained %s (%s): %d steps, %.0f CPU s, %.0f wall s", variant.name, budget, result.step, cpu, wall)
    return record


def pretrain_all(cfg: StudyConfig, work: Path, dataset: Any) -> list[dict[str, Any]]:
    """Every variant at equal steps, then (``equal_compute``) every other variant at the first
    one's CPU seconds (see module doc)."""
    runs = [_pretrain(cfg, v, cfg.steps, "equal-steps", work, dataset) for v in cfg.variants]
    if cfg.equal_compute and len(cfg.variants) > 1:
        budget = runs[0]["cpu_s"]
        for index, (variant, run) in enumerate(zip(cfg.variants[1:], runs[1:], strict=True), start=1):
            steps = max(1, round(budget / run["cpu_s_per_step"]))
            if cfg.compute_tolerance > 0 and abs(steps - run["steps"]) <= cfg.compute_tolerance * run["steps"]:
                runs[index] = {**run, "budget": MATCHED_BUDGET, "compute_target_cpu_s": budget,
                               "steps_at_compute_target": steps}
                continue
            record = _pretrain(cfg, variant, steps, "equal-compute", work, dataset)
            record["compute_target_cpu_s"] = budget
            runs.append(record)
    return runs


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
        label = _row_label(run)
        info = {k: run[k] for k in ("budget", "steps", "epochs", "cpu_s", "wall_s", "gflops_per_image")}
        rows.append(Row(label, lambda path=run["checkpoint"]: EncoderExtractor(checkpoint_encoder(path)),
                        info={**info, "curves": [run["variant"]["name"]]}))
    return rows


def _run_table(runs: list[dict[str, Any]]) -> list[str]:
    head = ["variant", "budget", "steps", "epochs", "CPU s", "wall s", "CPU s / step", "load avg (1 min, before/after)",
            "GFLOPs / image (train step, encoder fwd)", "final-epoch loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        flops = run["gflops_per_image"]
        loss = run["final_epoch_losses"].get("loss")
        lines.append("| " + " | ".join([
            run["variant"]["name"], run["budget"], str(run["steps"]), f"{run['epochs']:.2f}", f"{run['cpu_s']:.0f}",
            f"{run['wall_s']:.0f}", f"{run['cpu_s_per_step']:.3f}",
            f"{run['loadavg_before'][0]:.1f} / {run['loadavg_after'][0]:.1f}",
            f"{flops['train_step']:.3f}, {flops['encoder_forward']:.3f}", "-" if loss is None else f"{loss:.4f}"]) + " |")
    return lines


def _step_cost_spread(runs: list[dict[str, Any]]) -> str:
    """How much one variant's measured CPU seconds per step differ between its runs (the largest
    ratio over the variants run twice), as a phrase."""
    per_variant: dict[str, list[float]] = {}
    for run in runs:
        per_variant.setdefault(run["variant"]["name"], []).append(run["cpu_s_per_step"])
    spreads = {name: max(costs) / min(costs) - 1.0 for name, costs in per_variant.items() if len(costs) > 1}
    if not spreads:
        return "no variant ran twice, so their spread is not measured"
    name = max(spreads, key=spreads.__getitem__)
    return f"one variant's CPU s / step differed by up to {spreads[name]:.0%} between its two runs ({name})"


def _row_label(run: dict[str, Any]) -> str:
    return f"{run['variant']['name']}, {run['budget']} ({run['steps']} steps)"


def _reference_row(runs: list[dict[str, Any]]) -> str:
    """The row every other pre-trained row is compared with: the first variant's equal-steps run."""
    return _row_label(runs[0])


def markdown_report(study: dict[str, Any]) -> str:
    """The study as a markdown page."""
    env, titles, tasks = study["environment"], study["task_titles"], study["tasks"]
    runs, rows = study["pretraining"], study["rows"]
    compute = [r for r in runs if r["budget"] in ("equal-compute", MATCHED_BUDGET)]
    lines = [
        f"# {study['title']}", "",
        f"Measured {env['date']} on {env['device']} (pacofr {env['versions']['pacofr']}, torch "
        f"{env['versions']['torch']}, timm {env['versions']['timm']}); wall time of the pre-training runs "
        f"{sum(r['wall_s'] for r in runs) / 60:.0f} min and of the evaluated rows {sum(r['seconds'] for r in rows) / 60:.0f} "
        f"min (finished runs and rows are reused across invocations; this one took {study['wall_s'] / 60:.0f} min).",
        "",
        "## Pre-training", "",
        f"Config `{study['config']}` (+ `{' '.join(study['overrides']) or 'no overrides'}`): "
        f"{study['pretraining_images']} unlabelled train images ({study['pretraining_counts']}; test images never "
        f"seen), encoder {study['encoder']}. Every variant starts from the same initial weights (\"random init\").",
        "",
        *_run_table(runs), "",
        ("FLOPs per image: `torch.utils.flop_counter` on one batch of the torch backend (matrix products and "
         "attention; element-wise work is not counted); a training step is forward + backward after incubation "
         "(PaCo-FR's includes its EMA teacher and codebook), the encoder column one forward pass at inference."),
        "",
        ("Equal compute: the first variant's process CPU seconds are the budget; every other variant was run again "
         "for round(steps x budget / its own CPU seconds at equal steps) steps, its learning-rate schedule spanning "
         "exactly those steps, unless that step count is within "
         f"{study.get('compute_tolerance', 0.0):.0%} of its equal-steps count: then its equal-steps run stands for "
         f"equal compute (budget \"{MATCHED_BUDGET}\"). Achieved CPU seconds vs the budget: "
         + ", ".join(f"{r['variant']['name']} {r['cpu_s']:.0f} / {r['compute_target_cpu_s']:.0f}" for r in compute)
         + ". CPU seconds, not wall time, because other jobs shared the 2-core machine (load averages above); "
         f"CPU seconds vary with contention too: {_step_cost_spread(runs)}.") if compute else "",
        "",
        "## Results", "",
        ("Final-epoch test scores, mean ± std over seeds " + ", ".join(map(str, study["plan"]["probe"]["seeds"]))
         + "; hyper-parameters picked on a validation split carved from train, never on test. Ridge and k-NN "
         "have no randomness (std 0). Metrics: " + metric_line(rows, tasks, titles)),
        "",
        "#### Summary: linear probe, each pre-trained row against the first", "",
        ("The feature pool of each cell (class token or mean; tokens for landmarks) is the one that scores best on "
         "validation. Δ: the row's score minus the first variant's at equal steps, in the task's unit; ▲ / ▼ mark "
         "a difference larger than the larger of the two rows' seed stds, better / worse for that task's metric."),
        "",
        *summary_table(rows, tasks, titles, reference=_reference_row(runs)), "",
        *grid_tables(rows, tasks, titles),
        "![score vs pre-training CPU time](study.png)", "",
        "## Tasks", "",
        "| task | protocol | images train / val / test |", "|---|---|---|",
        *[f"| {titles[t]} | {study['task_protocols'][t]} | "
          + " / ".join(str(study['split_sizes'][t][s]) for s in ('train', 'val', 'test')) + " |" for t in tasks],
        "",
        "## Caveats", "",
        *[f"- {c}" for c in study["caveats"]], "",
    ]
    return "\n".join(lines)


def _caveats(runs: list[dict[str, Any]], img_size: int) -> list[str]:
    return [
        f"Small scale: {runs[0]['steps']} steps of batch {runs[0]['batch_size']} ({runs[0]['epochs']:.1f} epochs) for a "
        f"{img_size} px model; one pre-training seed per run, so the ± covers head / fine-tune seeds only.",
        "The landmark points of ytf_udacity68 are probably not hand-annotated: use the NME to rank rows, not to "
        "compare with published 300-W numbers.",
        "The pre-training images are the train images of UTKFace and FER-2013, two of the evaluated sets; the other "
        "sets were not seen in pre-training.",
    ]


def run_study(cfg: StudyConfig, out_dir: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """Pre-train, evaluate every row on every task, write the report files; return the JSON data."""
    from pacofr.data import Augment
    from pacofr.data.datasets import CroppedFaceDataset

    start = time.perf_counter()
    out_dir, work = Path(out_dir), Path(work_dir)
    pre_sets = load_tasks(list(PRETRAIN_TASKS), cfg.data_root)
    images, counts = pretraining_images(pre_sets)
    probe_cfg = pretrain_config(cfg, cfg.variants[0], cfg.steps, work / "probe")
    dataset = CroppedFaceDataset(images, image_size=probe_cfg.model.img_size,
                                 augment=Augment() if probe_cfg.data.augment else None)
    runs = pretrain_all(cfg, work, dataset)
    sets = load_tasks(list(cfg.tasks), cfg.data_root)
    grid = evaluate_grid(study_rows(cfg, runs), sets, cfg.plan, cache_dir=work / "rows")
    model = probe_cfg.model
    titles = {name: FACE_TASKS[name].title for name in cfg.tasks}
    study = {
        "title": f"Pre-training study: {', '.join(v.name for v in cfg.variants)} vs random init and classic baselines",
        "environment": environment(cfg.plan.device), "config": cfg.config, "overrides": list(cfg.overrides),
        "variants": [asdict(v) for v in cfg.variants], "data_root": cfg.data_root,
        "pretraining_images": len(images), "pretraining_counts": counts,
        "encoder": (f"ViT {model.img_size} px, patch {model.patch_size}, {model.embed_dim}-d, {model.depth} blocks, "
                    f"{model.num_heads} heads (a timm VisionTransformer with these arguments)"),
        "pretraining": runs, "compute_tolerance": cfg.compute_tolerance, "plan": plan_dict(cfg.plan), "tasks": list(cfg.tasks), "task_titles": titles,
        "task_protocols": {name: data.protocol for name, data in sets},
        "split_sizes": {name: data.split_sizes() for name, data in sets},
        "rows": grid, "caveats": _caveats(runs, model.img_size), "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(out_dir / RESULT_FILES[0], study)
    (out_dir / RESULT_FILES[1]).write_text(markdown_report(study))
    score_vs_time_plot(grid, list(cfg.tasks), titles, out_dir / RESULT_FILES[2],
                       "linear probe (mean-pooled patch tokens; tokens for landmarks) vs pre-training CPU seconds")
    logger.info("study written to %s", out_dir)
    return study
