"""Online monitoring of pre-training: a cheap k-NN probe of the encoder on a small labelled set.

Every ``train.monitor_every`` optimiser steps the trainer (rank 0) hands the model's encoder to a
:class:`KnnMonitor`: the images of the set's train and test splits (at most
``train.monitor_max_images`` of each, spread evenly over the split, decoded and resized once) go
through the encoder in eval mode without gradients, pooled with ``train.monitor_pool`` by the
evaluation package's own feature code (:func:`pacofr.eval.features.encoder_features`), and the
test images are classified by a cosine k-NN vote over the train images
(:func:`pacofr.eval.probe_heads.knn_predict`, ``train.monitor_k`` neighbours). The test accuracy and
the share of the test split's most common class (what always answering that class scores) are
logged beside the losses as ``monitor/knn_acc`` and ``monitor/majority`` (both in %).

The set is any labelled source ``pacofr eval`` accepts for ``--data`` with class labels: a
class-per-folder tree, a CSV or npz file, or ``proxy:NAME``. The probe draws no random numbers, and
it runs inside :func:`pacofr.train.seeding.isolated_rng`, so a monitored run trains exactly as an
unmonitored one and resumes exactly.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacofr.eval.data_sources import open_data
from pacofr.eval.features import encoder_features, image_batches, resize_rgb, to_input
from pacofr.eval.labelled import Targets
from pacofr.eval.metrics import score
from pacofr.eval.probe_heads import knn_predict
from pacofr.train.fields import ConfigError
from pacofr.train.seeding import isolated_rng

logger = logging.getLogger(__name__)

KNN_SCALAR = "monitor/knn_acc"
MAJORITY_SCALAR = "monitor/majority"
_SPLITS = ("train", "test")


def spread_evenly(indices: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` of ``indices``, evenly spaced over them (first and last kept), in order."""
    if len(indices) <= limit:
        return list(indices)
    return [indices[int(i)] for i in np.linspace(0, len(indices) - 1, limit).round()]


class KnnMonitor:
    """A k-NN probe of an encoder on a fixed train/test split of a labelled set.

    Args:
        source: the labelled set (a ``--data`` value of ``pacofr eval``); class targets only.
        k: neighbours that vote.
        max_images: the most images taken from each of the train and test splits.
        pool: the feature pool (:data:`pacofr.eval.choices.POOLS`).
        img_size, mean, std: the encoder's input side and pixel normalisation.
        batch_size: images per encoder forward.

    Raises :class:`ConfigError` naming ``train.monitor_data`` when the set cannot be read or has no
    class labels, no train or no test image.
    """

    def __init__(self, source: str, *, k: int, max_images: int, pool: str, img_size: int,
                 mean: Sequence[float], std: Sequence[float], batch_size: int = 64) -> None:
        self.k, self.pool, self.img_size, self.batch_size = k, pool, img_size, batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.images: dict[str, list[np.ndarray]] = {}
        self.targets: dict[str, Targets] = {}
        with tempfile.TemporaryDirectory(prefix="pacofr-monitor-") as scratch:  # a proxy set is written there
            try:
                self._load(source, Path(scratch), max_images)
            except (ValueError, OSError) as err:  # unreadable files and images included
                raise ConfigError(f"train.monitor_data={source!r}: {err}") from None
        test = self.targets["test"].values
        self.majority = 100.0 * float(torch.bincount(test).max()) / len(test)
        logger.info("k-NN monitor on %s: %d train and %d test images, k = %d, pool %s", source,
                    len(self.images["train"]), len(self.images["test"]), k, pool)

    def _load(self, source: str, scratch: Path, max_images: int) -> None:
        """Read the set, take the split's images, decode and resize them once (ValueError if unfit)."""
        data = open_data(source, scratch)
        if data.targets.kind != "class":
            raise ValueError(f"it holds {data.targets.kind} targets; the k-NN monitor needs class labels")
        for split in _SPLITS:
            chosen = spread_evenly(data.indices(split), max_images)
            if not chosen:
                raise ValueError(f"its {split} split is empty ({data.split_sizes()}); the monitor needs train and "
                                 "test images")
            self.images[split] = [resize_rgb(image, self.img_size)
                                  for batch in image_batches(data.images, chosen, self.batch_size) for image in batch]
            self.targets[split] = data.targets.select(chosen)

    def features(self, encoder: nn.Module, split: str) -> torch.Tensor:
        """float32 (N, F) features of the cached images of ``split`` (the caller sets eval mode)."""
        chunks = [encoder_features(encoder, to_input(self.images[split][start:start + self.batch_size], self.img_size),
                                   mean=self.mean, std=self.std, pools=(self.pool,))[self.pool]
                  for start in range(0, len(self.images[split]), self.batch_size)]
        return torch.cat(chunks)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """``{monitor/knn_acc, monitor/majority}`` (%) of ``encoder`` now; its train/eval mode and the
        global random generators are left as they were."""
        was_training = encoder.training
        encoder.eval()
        try:
            with isolated_rng(), torch.no_grad():
                bank, queries = (self.features(encoder, split) for split in _SPLITS)
        finally:
            encoder.train(was_training)
        outputs = knn_predict(bank, self.targets["train"], queries, self.k)
        return {KNN_SCALAR: score(outputs, self.targets["test"]), MAJORITY_SCALAR: self.majority}
