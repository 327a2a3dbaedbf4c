"""Export a pre-trained encoder as a plain timm model folder (``model.safetensors`` + ``config.json``).

The folder loads with ``timm.create_model("local-dir:" + folder, pretrained=True)`` or with
``timm.create_model(architecture, pretrained=False, **model_args)`` + ``load_state_dict``. Its
``config.json`` follows timm's hub layout (``architecture``, ``model_args``, ``pretrained_cfg`` with
the input size and the pixel mean/std) and adds ``alignment_recipe`` (how faces must be aligned
before they are fed) and ``pacofr`` (source checkpoint, step, method, version).

The output folder must be new, empty or an earlier export: a folder inside a run's checkpoints,
an existing file or a folder holding anything else is refused (nothing is overwritten there).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pacofr import checkpoint as ckpt
from pacofr.data.storage import give_default_mode, write_atomic
from pacofr.version import __version__

logger = logging.getLogger(__name__)

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_RECIPE = "alignment_recipe.json"
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_RECIPE)


class ExportTargetError(ValueError):
    """An ``--out`` folder that an export must not write into."""


@dataclass
class ExportResult:
    """Files of an export and the timm call that rebuilds the model."""

    out_dir: Path
    weights: Path
    config: Path
    architecture: str
    model_args: dict[str, Any]


def timm_config(model_cfg: Any, recipe: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` content for an encoder of ``model_cfg`` (a ``ModelConfig``)."""
    model_args = dict(model_cfg.timm_kwargs())
    model_args.pop("drop_path_rate", None)  # a training regulariser: fine-tuning picks its own
    size = model_cfg.img_size
    return {
        "architecture": model_cfg.timm_name,
        "num_classes": 0,
        "num_features": model_cfg.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": f"pacofr_{model_cfg.method}",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(model_cfg.pixel_mean),
            "std": list(model_cfg.pixel_std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "description": (f"PaCo-FR ({model_cfg.method}) face encoder pre-trained with pacofr {__version__}; "
                            "inputs are faces aligned with `alignment_recipe` and resized to input_size, "
                            "scaled to [0, 1], then normalised with mean/std"),
        },
        "alignment_recipe": recipe,
        "pacofr": source,
    }


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier export only (its files, with a pacofr ``config.json``, and
    perhaps the temporary file of an interrupted export)."""
    names = {child.name for child in folder.iterdir() if not child.name.startswith(".tmp-")}
    if not names <= set(EXPORT_FILES) or EXPORT_CONFIG not in names:
        return False
    try:
        return "pacofr" in json.loads((folder / EXPORT_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def check_export_target(out_dir: str | Path) -> None:
    """Raise :class:`ExportTargetError` unless ``out_dir`` is new, an empty folder or an earlier
    export, outside every checkpoint folder (an export there would replace checkpoint files)."""
    out_dir = Path(out_dir)
    area = ckpt.checkpoint_area_of(out_dir)
    if area is not None:
        raise ExportTargetError(f"--out {out_dir} lies inside {area}, which holds training checkpoints: an export "
                                "there could replace them; choose a folder outside the checkpoints, e.g. "
                                "RUN/export")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportTargetError(f"--out {out_dir} is an existing file, not a folder; choose a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_export(out_dir):
        raise ExportTargetError(f"--out {out_dir} already holds files that are not an earlier export "
                                f"({', '.join(sorted(c.name for c in out_dir.iterdir())[:5])}); choose a new or "
                                "empty folder")


def export_encoder(checkpoint: str | Path, out_dir: str | Path, teacher: bool = False) -> ExportResult:
    """Write the encoder of ``checkpoint`` (the student, or the EMA ``teacher``) as a timm model folder.

    ``out_dir`` must pass :func:`check_export_target`; an earlier export there is replaced file by
    file (each written to a temporary name, then renamed). The checkpoint is verified first
    (:class:`~pacofr.checkpoint.CorruptCheckpointError` when it is corrupted or its meta.json
    holds no config); weights that are not finite are refused (ValueError).
    """
    from pacofr.models import build_model
    from pacofr.train.config import PretrainConfig

    check_export_target(out_dir)
    loaded = ckpt.load_checkpoint(checkpoint)
    cfg = PretrainConfig.from_dict(loaded.config)
    model = build_model(cfg.model)
    ckpt.load_weights(model, loaded)
    encoder = model.teacher if teacher else model.encoder
    if encoder is None:
        raise ValueError(f"{loaded.path} has no EMA teacher (method={cfg.model.method}, sc={cfg.model.sc}); "
                         "export the student encoder instead")
    source = {"checkpoint": str(loaded.path), "step": loaded.step, "epoch": loaded.epoch,
              "method": cfg.model.method, "encoder": "teacher" if teacher else "student",
              "trained_with": loaded.meta.get("pacofr_version"), "exported_with": __version__}
    config = timm_config(cfg.model, loaded.meta.get("alignment_recipe", {}), source)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    not_finite = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if not_finite:
        raise ValueError(f"checkpoint {loaded.path}: the encoder's weights hold NaN or inf ({', '.join(not_finite[:3])}"
                         f"{', ...' if len(not_finite) > 3 else ''}): the run diverged; export an earlier checkpoint")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / EXPORT_WEIGHTS
    partial = out_dir / f".tmp-{os.getpid()}-{EXPORT_WEIGHTS}"
    save_file(state, str(partial), metadata={"format": "pt"})
    give_default_mode(partial)  # safetensors creates it 0600; the other files follow the umask
    os.replace(partial, weights)
    config_path = out_dir / EXPORT_CONFIG
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    write_atomic(out_dir / EXPORT_RECIPE, (json.dumps(config["alignment_recipe"], indent=2) + "\n").encode("utf-8"))
    logger.info("exported the %s encoder of %s (step %d) to %s", source["encoder"], loaded.path, loaded.step, out_dir)
    return ExportResult(out_dir, weights, config_path, config["architecture"], config["model_args"])
