"""Classification evaluations of a loaded encoder on a labelled set: linear probe and fine-tune.

Both read the images once at the encoder's input size, split them by the fixed rule of
:mod:`pacofr.eval.labelled`, and report final-epoch test accuracy over seeds
(:mod:`pacofr.eval.metrics`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pacofr.eval.encoders import LoadedEncoder
from pacofr.eval.features import encode_images, load_images
from pacofr.eval.finetune import FinetuneConfig, run_finetune
from pacofr.eval.labelled import SPLIT_FRACTIONS, SPLIT_SALT, LabelledSet
from pacofr.eval.linear_probe import ProbeConfig, run_probe
from pacofr.eval.metrics import SPLITS

logger = logging.getLogger(__name__)


def check_labelled(data: LabelledSet) -> None:
    """Raise ValueError when ``data`` cannot give honest numbers: fewer than 2 classes, or an empty
    train or test split."""
    if len(data.class_names) < 2:
        raise ValueError(f"the labelled set has {len(data.class_names)} class(es) {data.class_names}; need at least 2")
    for split in ("train", "test"):
        if not data.indices(split):
            raise ValueError(f"the {split} split of the {len(data.paths)} labelled images is empty (splits take about "
                             f"{SPLIT_FRACTIONS} by a hash of each path); use more images")


def describe_data(data: LabelledSet, source: str) -> dict[str, Any]:
    """JSON-friendly description of a labelled set and its split."""
    sizes = {s: len(data.indices(s)) for s in SPLITS}
    per_class: dict[str, dict[str, int]] = {}
    if not data.multi_label:
        for split in SPLITS:
            counts = torch.bincount(data.labels[data.indices(split)], minlength=len(data.class_names))
            per_class[split] = {name: int(c) for name, c in zip(data.class_names, counts.tolist(), strict=True)}
    return {"source": str(source), "num_images": len(data.paths), "classes": list(data.class_names),
            "multi_label": data.multi_label, "split_sizes": sizes, "per_class": per_class,
            "split_rule": f"sha1('{SPLIT_SALT}:' + relative path) -> {SPLIT_FRACTIONS}"}


def split_images(encoder: LoadedEncoder, data: LabelledSet) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Images float32 (N, 3, S, S) in [0, 1] at the encoder's input size and labels, per split."""
    images = load_images(data.paths, encoder.img_size)
    by_split = {s: torch.tensor(data.indices(s), dtype=torch.long) for s in SPLITS}
    return ({s: images[i] for s, i in by_split.items()}, {s: data.labels[i] for s, i in by_split.items()})


def linear_probe_encoder(encoder: LoadedEncoder, data: LabelledSet, *, pool: str = "cls",
                         cfg: ProbeConfig | None = None, device: str = "cpu",
                         batch_size: int = 64) -> dict[str, Any]:
    """Frozen features of ``encoder`` -> standardised -> linear probe per seed (see ``run_probe``)."""
    cfg = cfg or ProbeConfig()
    check_labelled(data)
    images, labels = split_images(encoder, data)
    features = {s: encode_images(encoder.model, images[s], mean=encoder.mean, std=encoder.std, pool=pool,
                                 batch_size=batch_size, device=device) for s in SPLITS}
    logger.info("linear probe on %s features (dim %d) of %s", pool, features["train"].shape[1],
                {s: int(f.shape[0]) for s, f in features.items()})
    result = run_probe(features, labels, len(data.class_names), data.multi_label, cfg)
    result["feature_dim"] = int(features["train"].shape[1])
    return result


def finetune_encoder(encoder: LoadedEncoder, data: LabelledSet, *, pool: str = "cls",
                     cfg: FinetuneConfig | None = None, device: str = "cpu") -> dict[str, Any]:
    """A short full fine-tune of a copy of ``encoder`` per seed (see ``run_finetune``)."""
    cfg = cfg or FinetuneConfig()
    check_labelled(data)
    images, labels = split_images(encoder, data)
    logger.info("fine-tuning (%s pool) for %d epochs x %d seeds", pool, cfg.epochs, len(cfg.seeds))
    return run_finetune(encoder.model, images, labels, len(data.class_names), data.multi_label,
                        mean=encoder.mean, std=encoder.std, pool=pool, cfg=cfg, device=device)
