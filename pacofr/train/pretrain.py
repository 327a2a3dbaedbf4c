"""Pre-training from a :class:`PretrainConfig`: data set, model, trainer (what ``pacofr pretrain`` runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset

from pacofr.train.config import DataConfig, PretrainConfig
from pacofr.train.distributed import init_distributed
from pacofr.train.fields import ConfigError
from pacofr.train.seeding import seed_everything
from pacofr.train.trainer import TrainResult, Trainer

logger = logging.getLogger(__name__)

UNSET_ROOT = "???"


def build_dataset(data: DataConfig, image_size: int) -> Dataset:
    """The training set of ``data`` at ``image_size`` px: the packaged demo faces (``root="demo"``),
    a folder prepared as image files or as tar shards (``layout="prepared"``), or already-cropped
    faces in a folder, ``.zip`` or ``.npz`` (``layout="crops"``), read where they are. Its items
    are uint8 (the trainer augments each batch on the device when ``data.augment``)."""
    from pacofr.data import AlignedFaceDataset, ShardFaceDataset, demo_dataset
    from pacofr.data.datasets import CroppedFaceDataset
    from pacofr.data.image_sets import open_image_set
    from pacofr.data.storage import INDEX_NAME, SHARDS_DIR

    if data.root == "demo":
        return demo_dataset(image_size=image_size, uint8=True)
    if data.root in ("", UNSET_ROOT):
        raise ConfigError("data.root is not set: pass --set data.root=DIR with a folder written by "
                          "`pacofr prepare` (or of face crops with data.layout=crops), or data.root=demo "
                          "for the packaged demo faces")
    root = Path(data.root).expanduser()
    if data.layout == "crops":
        try:
            return CroppedFaceDataset(open_image_set(root), image_size=image_size, uint8=True)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data.root={data.root!r} (data.layout=crops): {err}") from err
    if not root.is_dir():
        raise ConfigError(f"data.root={data.root!r} is not a folder")
    if not (root / INDEX_NAME).is_file():
        raise ConfigError(f"data.root={data.root!r} has no {INDEX_NAME}, so it was not written by `pacofr prepare`; "
                          "for a folder (or .zip / .npz) of images that are already face crops, pass "
                          "--set data.layout=crops")
    cls = ShardFaceDataset if (root / SHARDS_DIR).is_dir() else AlignedFaceDataset
    return cls(root, image_size=image_size, uint8=True)


def alignment_recipe_of(dataset: Dataset) -> dict[str, Any]:
    """The face-alignment recipe the data set's crops were made with (the default one if it has none)."""
    recipe = getattr(dataset, "recipe", None)
    if recipe is None:
        from pacofr.data import AlignmentRecipe

        recipe = AlignmentRecipe()
    return recipe.to_dict()


def run_pretraining(cfg: PretrainConfig, resume: str | Path | None = None, overwrite: bool = False,
                    dataset: Dataset | None = None) -> TrainResult:
    """Build the data set and model of ``cfg`` and train (under ``torchrun`` on every rank).

    ``resume``: a checkpoint, checkpoints folder or run folder to continue from exactly.
    ``overwrite``: a fresh run may delete an earlier run's files in ``train.out_dir``.
    ``dataset``: train on this data set instead of the one ``cfg.data`` describes (items as
    :mod:`pacofr.data.datasets` gives them; e.g. the train splits of evaluation sets).
    """
    from pacofr.models import build_model

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.train.device)
    try:
        if dataset is None:
            dataset = build_dataset(cfg.data, cfg.model.img_size)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        trainer = Trainer(cfg, model, dataset, dist_info=info, recipe=alignment_recipe_of(dataset))
        return trainer.fit(resume_from=resume, overwrite=overwrite)
    finally:
        if owns_group and info.distributed:
            dist.destroy_process_group()
