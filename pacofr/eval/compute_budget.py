"""Pre-training the study's variants under a compute budget: every variant at equal steps, then at the first
variant's CPU seconds (see :mod:`pacofr.eval.study`); FLOPs per image; each run's record.

A finished run is kept in the work folder with its record (:data:`RUN_RECORD`) and reused when the
study asks for the same config again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pacofr.eval.report import write_json
from pacofr.eval.study_variants import StudyConfig, Variant, pretrain_config

logger = logging.getLogger(__name__)

RUN_RECORD = "study_run.json"
MATCHED_BUDGET = "equal steps ~ compute"  # an equal-steps run within compute_tolerance of the compute budget


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
