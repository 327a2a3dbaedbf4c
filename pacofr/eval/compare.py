"""PaCo-FR vs the MAE-face control vs random initialisation, at an equal pre-training budget.

Both methods are pre-trained by :func:`pacofr.train.pretrain.run_pretraining` from one config
(same data, epochs, steps, batch, resolution, encoder, seed) that differs only in
``model.method``; "random init" is the encoder both runs start from. The three encoders then go
through the same linear probe (and optionally the same fine-tune) on the same labelled set, and
the results are written as ``compare.json``, ``compare.md`` (a table) and ``compare.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pacofr.eval.encoders import LoadedEncoder, checkpoint_encoder, random_encoder
from pacofr.eval.evaluate import describe_data, finetune_encoder, linear_probe_encoder
from pacofr.eval.finetune import FinetuneConfig
from pacofr.eval.labelled import LabelledSet
from pacofr.eval.linear_probe import ProbeConfig
from pacofr.eval.proxy import demo_overlap, is_proxy, open_labelled, proxy_set
from pacofr.eval.report import bar_plot, environment, markdown_table, write_json
from pacofr.train.metrics import ScalarCSV

logger = logging.getLogger(__name__)

METHOD_NAMES = {"paco": "PaCo-FR", "mae": "MAE-face"}
RESULT_FILES = ("compare.json", "compare.md", "compare.png")
_QUIET = ("train.progress=false", "train.viz_every=0", "train.ckpt_every=0", "train.keep_last=1")


@dataclass
class CompareConfig:
    """What :func:`run_compare` trains and evaluates.

    ``config``/``overrides``: the pre-training config (a packaged preset or YAML file, plus
    ``KEY=VALUE`` overrides) shared by every method; ``epochs``/``max_steps`` set the budget when
    given. ``finetune`` = None skips fine-tuning.
    """

    config: str = "demo"
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    max_steps: int | None = None
    methods: tuple[str, ...] = ("paco", "mae")
    data: str = "proxy:lfw-face-vs-nonface"
    pool: str = "cls"
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {tuple(METHOD_NAMES)}, got {self.methods}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def pretrain_config(cfg: CompareConfig, method: str, out_dir: Path) -> Any:
    """The :class:`PretrainConfig` of ``method`` under ``cfg``'s shared budget."""
    from pacofr.train.config import load_config

    overrides = [*_QUIET, *cfg.overrides]
    if cfg.epochs is not None:
        overrides.append(f"train.epochs={cfg.epochs}")
    if cfg.max_steps is not None:
        overrides.append(f"train.max_steps={cfg.max_steps}")
    overrides += [f"model.method={method}", f"train.out_dir={out_dir}"]
    return load_config(cfg.config, overrides)


def _last_epoch_losses(scalars: Path | None, last_step: int, steps_per_epoch: int) -> dict[str, float]:
    """Mean of every ``loss*`` column over the rows logged in the last ``steps_per_epoch`` optimiser
    steps up to ``last_step`` (the final epoch; empty cells skipped)."""
    if scalars is None:
        return {}
    tail = [row for row in ScalarCSV(scalars).read() if int(row["step"]) > last_step - steps_per_epoch]
    means: dict[str, float] = {}
    for key in (tail[0].keys() if tail else ()):
        values = [float(r[key]) for r in tail if key.startswith("loss") and r.get(key)]
        if values:
            means[key] = sum(values) / len(values)
    return means


def _pretrain(cfg: CompareConfig, method: str, work_dir: Path) -> tuple[LoadedEncoder, dict[str, Any], Any]:
    from pacofr.train.pretrain import build_dataset, run_pretraining

    run_cfg = pretrain_config(cfg, method, work_dir / method)
    start = time.perf_counter()
    result = run_pretraining(run_cfg, overwrite=True)  # the work folder holds scratch runs
    wall = time.perf_counter() - start
    encoder = checkpoint_encoder(result.checkpoint)
    images = len(build_dataset(run_cfg.data, run_cfg.model.img_size))
    steps_per_epoch = images // run_cfg.train.batch_size // run_cfg.train.accum_steps
    info = {"method": method, "steps": result.step, "epochs": run_cfg.train.epochs, "steps_per_epoch": steps_per_epoch,
            "images": images, "wall_s": round(wall, 1), "checkpoint": str(result.checkpoint),
            "final_epoch_losses": _last_epoch_losses(result.scalars, result.step, max(1, steps_per_epoch))}
    logger.info("pre-trained %s: %d steps in %.0f s", method, result.step, wall)
    return encoder, info, run_cfg


def _majority_baseline(data: LabelledSet) -> float | None:
    """Test accuracy of always answering the most frequent training class (single-label only)."""
    if data.multi_label:
        return None
    train, test = data.labels[data.indices("train")], data.labels[data.indices("test")]
    majority = int(torch.bincount(train, minlength=len(data.class_names)).argmax())
    return float((test == majority).float().mean())


def _caveats(cfg: CompareConfig, budget: dict[str, Any]) -> list[str]:
    notes = []
    if is_proxy(cfg.data):
        notes.append("The probe is a PROXY task (face vs non-face on scikit-image's 25x25 LFW subset), not "
                     "face recognition, expression or attributes: no labelled face set installs offline.")
        if cfg.data.endswith("lfw-face-vs-nonface") and budget["config"] == "demo":
            notes.append(f"{demo_overlap()} of the proxy's 100 face images are, aligned and enlarged, among the "
                         "demo pre-training faces (seen without labels by both pre-trained encoders).")
    notes.append(f"Tiny scale: {budget['images']} pre-training images, {budget['steps']} steps, one pre-training "
                 "seed; the spread covers probe seeds only, and the test split is small, so differences of a "
                 "few test images are noise. Not evidence about PaCo-FR at scale.")
    return notes


def run_compare(cfg: CompareConfig, out_dir: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """Pre-train every method of ``cfg`` into ``work_dir``, probe them and random init on ``cfg.data``,
    write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``; return the JSON data."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    data = open_labelled(cfg.data, work_dir / "data")

    pretrained = [(METHOD_NAMES[m], *_pretrain(cfg, m, work_dir)) for m in cfg.methods]
    steps = {info["method"]: info["steps"] for _, _, info, _ in pretrained}
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"the pre-training budgets differ: steps {steps}")
    first_cfg = pretrained[0][3]
    model_cfg, train_cfg = first_cfg.model, first_cfg.train
    baseline = random_encoder(model_cfg, seed=train_cfg.seed)
    candidates = [*[(name, enc, info) for name, enc, info, _ in pretrained], ("random init", baseline, None)]

    encoders = []
    for name, encoder, info in candidates:
        probe = linear_probe_encoder(encoder, data, pool=cfg.pool, cfg=cfg.probe, device=cfg.device)
        tuned = (finetune_encoder(encoder, data, pool=cfg.pool, cfg=cfg.finetune, device=cfg.device)
                 if cfg.finetune is not None else None)
        logger.info("%s: probe %.4f +- %.4f", name, probe["final_test_mean"], probe["final_test_std"])
        encoders.append({"name": name, "source": encoder.source, "pretraining": info,
                         "linear_probe": probe, "finetune": tuned})

    info0 = pretrained[0][2]
    budget = {"config": cfg.config, "overrides": list(cfg.overrides), "epochs": train_cfg.epochs,
              "steps": info0["steps"], "steps_per_epoch": info0["steps_per_epoch"], "images": info0["images"],
              "batch_size": train_cfg.batch_size * train_cfg.accum_steps, "img_size": model_cfg.img_size,
              "patch_size": model_cfg.patch_size, "seed": train_cfg.seed,
              "encoder": f"timm {model_cfg.timm_name} with embed_dim={model_cfg.embed_dim}, depth={model_cfg.depth}, "
                         f"num_heads={model_cfg.num_heads}"}
    data_info = describe_data(data, cfg.data)
    data_info["chance"] = _majority_baseline(data)
    if is_proxy(cfg.data):
        data_info["proxy_description"] = proxy_set(cfg.data).description
    title = f"PaCo-FR vs MAE-face vs random init, linear probe on {cfg.data} ({budget['config']} scale)"
    compare = {
        "title": title,
        "plot_title": f"{cfg.data}, {budget['steps']} pre-training steps on {budget['images']} faces",
        "environment": environment(cfg.device),
        "budget": budget,
        "data": data_info,
        "probe": {"pool": cfg.pool, "config": asdict(cfg.probe)},
        "finetune": asdict(cfg.finetune) if cfg.finetune is not None else None,
        "encoders": encoders,
        "pretrain_configs": {m: run_cfg.to_dict() for m, (_, _, _, run_cfg) in zip(cfg.methods, pretrained, strict=True)},
        "caveats": _caveats(cfg, budget),
    }
    write_json(out_dir / RESULT_FILES[0], compare)
    (out_dir / RESULT_FILES[1]).write_text(markdown_table(compare))
    bar_plot(compare, out_dir / RESULT_FILES[2])
    logger.info("comparison written to %s", out_dir)
    return compare
