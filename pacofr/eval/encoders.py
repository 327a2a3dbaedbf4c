"""Encoders to evaluate, from three kinds of source (the ``--checkpoint`` argument).

* a pacofr training checkpoint (a ``step_*`` folder, a ``checkpoints`` folder or a run folder,
  see :func:`pacofr.checkpoint.resolve_checkpoint`): the ``encoder.`` (or ``teacher.``) weights are
  read from its ``model.safetensors`` into the timm ViT its stored config describes;
* a folder written by ``pacofr export`` (``config.json`` + ``model.safetensors``): rebuilt with
  ``timm.create_model(architecture, **model_args)`` and loaded strictly;
* ``random:PRESET``: a freshly initialised encoder of a :class:`ModelConfig` preset (``demo``,
  ``tiny``...), built exactly as pre-training builds it, from ``seed``.

Every source also gives the input size and the pixel mean/std the encoder was trained with, so
evaluation images are resized and normalised as in pre-training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pacofr.models.config import ModelConfig

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
_EXPORT_FILES = ("config.json", "model.safetensors")


@dataclass
class LoadedEncoder:
    """A timm VisionTransformer (no head) and how its inputs must look.

    ``img_size``: side of the square input; ``mean``/``std``: per-channel normalisation of images in
    [0, 1]; ``source``: JSON-friendly description (kind, path, step, method...).
    """

    model: torch.nn.Module
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)


def random_encoder(model_cfg: ModelConfig, seed: int = 0, preset: str | None = None) -> LoadedEncoder:
    """A randomly initialised encoder of ``model_cfg``, built as ``PaCoFR`` builds it right after
    ``seed_everything(seed)`` in pre-training (so it equals a run's starting weights). The global
    random generators are left as they were."""
    from pacofr.models.vit import build_encoder
    from pacofr.train.seeding import isolated_rng, seed_everything

    with isolated_rng():
        seed_everything(seed)
        model = build_encoder(model_cfg)
    return LoadedEncoder(model, model_cfg.img_size, model_cfg.pixel_mean, model_cfg.pixel_std,
                         {"kind": "random", "preset": preset, "seed": seed, "architecture": model_cfg.timm_name,
                          "model_args": model_cfg.timm_kwargs()})


def checkpoint_encoder(path: str | Path, teacher: bool = False) -> LoadedEncoder:
    """The student (or EMA ``teacher``) encoder of a pacofr training checkpoint."""
    from pacofr import checkpoint as ckpt
    from pacofr.models.vit import build_encoder
    from pacofr.train.config import PretrainConfig

    loaded = ckpt.load_checkpoint(path)
    cfg = PretrainConfig.from_dict(loaded.config).model
    prefix = "teacher." if teacher else "encoder."
    state = {k[len(prefix):]: v for k, v in load_file(str(loaded.path / ckpt.WEIGHTS_FILE)).items()
             if k.startswith(prefix)}
    if not state:
        raise ValueError(f"checkpoint {loaded.path} holds no {prefix[:-1]} weights"
                         + (" (it has no EMA teacher: evaluate the student)" if teacher else ""))
    model = build_encoder(cfg.replace(drop_path_rate=0.0))  # as `pacofr export` writes it
    model.load_state_dict(state, strict=True)
    return LoadedEncoder(model, cfg.img_size, cfg.pixel_mean, cfg.pixel_std,
                         {"kind": "checkpoint", "path": str(loaded.path), "step": loaded.step,
                          "epoch": loaded.epoch, "method": cfg.method, "architecture": cfg.timm_name,
                          "model_args": cfg.timm_kwargs(),
                          "encoder": "teacher" if teacher else "student"})


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``pacofr export`` (or any timm hub-style folder)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in _EXPORT_FILES)


def export_encoder_model(folder: str | Path) -> LoadedEncoder:
    """The encoder of a timm model folder (``config.json`` with architecture, model_args and
    pretrained_cfg, plus ``model.safetensors``), loaded strictly."""
    import timm

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{folder / 'config.json'} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'config.json'} must hold a JSON object")
    try:
        architecture = config["architecture"]
        pretrained = config["pretrained_cfg"]
        size = int(pretrained["input_size"][-1])
        mean, std = tuple(pretrained["mean"]), tuple(pretrained["std"])
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{folder / 'config.json'} lacks architecture / pretrained_cfg input_size, mean, std: {err}") from err
    if not timm.is_model(architecture):
        raise ValueError(f"{folder / 'config.json'}: architecture {architecture!r} is not a timm model")
    try:
        model = timm.create_model(architecture, pretrained=False, **{"num_classes": 0, **config.get("model_args", {})})
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except (RuntimeError, TypeError, SafetensorError) as err:  # a config that builds another model, cut weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: model.safetensors does not fit config.json ({architecture}, model_args) or is "
                         f"damaged: {first[:300]}") from err
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{folder / 'config.json'}: pretrained_cfg mean/std need 3 values, got {mean}, {std}")
    return LoadedEncoder(model, size, mean, std,
                         {"kind": "export", "path": str(folder), "architecture": architecture,
                          **{k: v for k, v in config.get("pacofr", {}).items() if k in ("step", "method", "encoder")}})


def load_encoder(spec: str, teacher: bool = False, seed: int = 0) -> LoadedEncoder:
    """An encoder from ``spec``: ``random:PRESET``, an export folder, or a training checkpoint
    (see module doc). Raises ValueError / FileNotFoundError naming what was expected."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        if teacher:
            raise ValueError("--teacher applies to training checkpoints, not to random:PRESET")
        preset = spec[len(RANDOM_PREFIX):]
        loaded = random_encoder(ModelConfig.preset(preset), seed=seed, preset=preset)
    elif is_export_dir(spec):
        if teacher:
            raise ValueError(f"{spec} is an export folder (one encoder); --teacher applies to training checkpoints")
        loaded = export_encoder_model(spec)
    elif not Path(spec).exists():
        raise FileNotFoundError(f"{spec} does not exist; expected a training checkpoint (step_* folder, "
                                f"checkpoints folder or run folder), an export folder, or {RANDOM_PREFIX}PRESET")
    else:
        loaded = checkpoint_encoder(spec, teacher=teacher)
    logger.info("encoder from %s: %s, %d px input, %d-d", spec, loaded.source.get("kind"), loaded.img_size,
                loaded.embed_dim)
    return loaded
