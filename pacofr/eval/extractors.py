"""What a row of an evaluation table measures: an encoder or a classic baseline, as features.

Every row goes through the same code path: :func:`extract_features` streams a set's images
through the row's :class:`Extractor` batch by batch, the protocols (:mod:`pacofr.eval.probe_protocols`)
fit their heads on the result. An extractor offers *pools*: an encoder ``cls`` and ``mean``
(global tasks) and ``tokens`` (spatial tasks, e.g. landmarks); a baseline its one descriptor
for both. ``--checkpoint`` values name extractors: ``baseline:raw|pca|hog|lbp``, ``random:PRESET``,
a training checkpoint or an export folder (:func:`pacofr.eval.encoders.load_encoder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pacofr.data.image_sets import ImageSet
from pacofr.eval.baselines import (BASELINE_SIZE, BASELINE_TITLES, BASELINES, baseline_features, fit_pca,
                                   require_dependencies)
from pacofr.eval.encoders import LoadedEncoder, load_encoder
from pacofr.eval.features import encoder_features, image_batches, to_input


BASELINE_PREFIX = "baseline:"
ENCODER_GLOBAL_POOLS = ("cls", "mean")
ENCODER_SPATIAL_POOL = "tokens"


class Extractor:
    """Base class. ``name``: the row label; ``global_pools`` / ``spatial_pool``: the feature kinds
    for global and spatial tasks; ``encoder``: the encoder (None for baselines)."""

    name: str
    global_pools: tuple[str, ...]
    spatial_pool: str
    encoder: LoadedEncoder | None = None

    def features(self, batch: Sequence[np.ndarray], pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """float32 (B, F) features of uint8 RGB images for every pool of ``pools``."""
        raise NotImplementedError

    def fit_transform(self, pool: str, features: torch.Tensor, fit_rows: torch.Tensor) -> torch.Tensor:
        """Features of a whole set after a transform fitted on the rows ``fit_rows`` (identity here)."""
        return features

    def running(self, device: str) -> contextlib.AbstractContextManager:
        """Context in which :meth:`features` runs (an encoder: in eval mode on ``device``)."""
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the row."""
        raise NotImplementedError


@dataclass
class EncoderExtractor(Extractor):
    """Features of a timm ViT encoder (see :mod:`pacofr.eval.features` for the pools)."""

    encoder: LoadedEncoder
    name: str = "encoder"
    global_pools: tuple[str, ...] = ENCODER_GLOBAL_POOLS
    spatial_pool: str = ENCODER_SPATIAL_POOL

    def features(self, batch: Sequence[np.ndarray], pools: Sequence[str]) -> dict[str, torch.Tensor]:
        inputs = to_input(batch, self.encoder.img_size)
        return encoder_features(self.encoder.model, inputs, mean=self.encoder.mean, std=self.encoder.std, pools=pools)

    @contextlib.contextmanager
    def running(self, device: str) -> Iterator[None]:
        model = self.encoder.model
        home = next(model.parameters()).device
        was_training = model.training
        model.eval().to(device)
        try:
            yield
        finally:
            model.train(was_training).to(home)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "encoder", "source": dict(self.encoder.source), "img_size": self.encoder.img_size,
                "embed_dim": self.encoder.embed_dim, "mean": list(self.encoder.mean), "std": list(self.encoder.std)}


@dataclass
class BaselineExtractor(Extractor):
    """A classic descriptor (:mod:`pacofr.eval.baselines`); ``pca`` is fitted per task on its train rows."""

    baseline: str
    size: int = BASELINE_SIZE
    name: str = ""

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; known: {[BASELINE_PREFIX + b for b in BASELINES]}")
        require_dependencies([self.baseline])
        self.name = self.name or BASELINE_TITLES[self.baseline]
        self.global_pools = (self.baseline,)
        self.spatial_pool = self.baseline

    def features(self, batch: Sequence[np.ndarray], pools: Sequence[str]) -> dict[str, torch.Tensor]:
        values = baseline_features(self.baseline, batch, self.size)
        return {pool: values for pool in pools}

    def fit_transform(self, pool: str, features: torch.Tensor, fit_rows: torch.Tensor) -> torch.Tensor:
        if self.baseline != "pca":
            return features
        mean, components = fit_pca(features[fit_rows])
        return (features - mean) @ components

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "baseline", "baseline": self.baseline, "grey_size": self.size}


def open_extractor(spec: str, *, name: str | None = None, teacher: bool = False, init_seed: int = 0,
                   baseline_size: int = BASELINE_SIZE) -> Extractor:
    """The extractor a ``--checkpoint`` value names (see module doc); ``name`` labels its row."""
    if spec.startswith(BASELINE_PREFIX):
        if teacher:
            raise ValueError("--teacher applies to training checkpoints, not to baselines")
        return BaselineExtractor(spec[len(BASELINE_PREFIX):], size=baseline_size, name=name or "")
    encoder = load_encoder(spec, teacher=teacher, seed=init_seed)
    return EncoderExtractor(encoder, name=name or default_name(encoder))


def default_name(encoder: LoadedEncoder) -> str:
    """A row label for an encoder from its source."""
    source = encoder.source
    if source.get("kind") == "random":
        return f"random init ({source.get('preset')})"
    method = {"paco": "PaCo-FR", "mae": "MAE-face"}.get(str(source.get("method")), "encoder")
    return f"{method} step {source['step']}" if source.get("step") is not None else method


def extract_features(extractor: Extractor, images: ImageSet, pools: Sequence[str], *, batch_size: int = 64,
                     device: str = "cpu", indices: Sequence[int] | None = None,
                     progress: bool | None = None) -> dict[str, torch.Tensor]:
    """float32 (N, F) features of ``images`` (or of the images ``indices``) for every pool,
    decoding and encoding ``batch_size`` images at a time. ``progress``: a tqdm bar on stderr
    (None: only when stderr is a terminal)."""
    from tqdm import tqdm

    order = list(range(len(images))) if indices is None else list(indices)
    chunks: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
    with extractor.running(device), tqdm(total=len(order), unit="img", desc=f"features {extractor.name}",
                                         disable=None if progress is None else not progress, leave=False) as bar:
        for batch in image_batches(images, order, batch_size):
            for pool, values in extractor.features(batch, pools).items():
                chunks[pool].append(values)
            bar.update(len(batch))
    return {pool: torch.cat(parts) if parts else torch.empty(0, 0) for pool, parts in chunks.items()}
