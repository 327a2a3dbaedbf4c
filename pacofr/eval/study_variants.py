"""Study variants: a named pre-training (``[NAME=]METHOD[:KEY=VALUE,...]``), the study's settings
(:class:`StudyConfig`) and the pre-training config of a variant (:func:`pretrain_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacofr.eval.baselines import BASELINES
from pacofr.eval.evaluate import EvalPlan
from pacofr.eval.face_protocols import FACE_TASKS

METHOD_NAMES = {"paco": "PaCo-FR", "mae": "MAE-face", "mcf": "MCF-style", "fra": "FRA-style"}
#: the face tasks whose train images (train and val splits) are the study's pre-training set
PRETRAIN_TASKS = ("utkface-gender", "fer2013")
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
    """What :func:`pacofr.eval.study.run_study` pre-trains and evaluates.

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
