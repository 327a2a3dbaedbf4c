"""MCF's frozen target network: any timm model whose patch features the decoder learns to predict.

MCF regresses the features of a frozen pre-trained MoCo-v3 ViT. Offline, this project's default
target is its own EMA teacher (``model.mcf_target=ema``); ``model.mcf_target`` may instead name a
network, loaded once and frozen:

* a timm model folder (``config.json`` with ``architecture`` and ``pretrained_cfg``, and
  ``model.safetensors``: ``pacofr export`` output or a hub snapshot; any timm architecture, ViT or
  CNN), loaded by ``timm.create_model("local-dir:" + folder, pretrained=True)``;
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=True)`` (``NAME`` may be ``hf-hub:org/model``;
  timm downloads the weights, so this needs a network connection or timm's cache);
* a pacofr training run or checkpoint (its student encoder), or ``random:PRESET``, through
  :func:`pacofr.eval.encoders.load_encoder`.

The network is not a submodule of the model: checkpoints do not carry its weights (the config
records ``mcf_target``, and a resumed run loads it again from there).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models.vit import normalise_pixels

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


@dataclass
class FrozenTargetNetwork:
    """A frozen network (eval mode, no gradients) and the inputs it expects.

    ``img_size``: side its images are resized to; ``mean`` / ``std``: normalisation of images in [0, 1].
    """

    model: nn.Module
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    spec: str

    def __post_init__(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def num_features(self) -> int:
        """C, the width of its patch features."""
        return int(self.model.num_features)

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, grid * grid, C) features on a ``grid`` x ``grid`` patch grid of images (B, 3, S, S) in [0, 1].

        The images are resized (bilinear) to :attr:`img_size` and normalised; the network's feature
        map (ViT tokens without prefix tokens, or a CNN map) is average-pooled (or repeated) onto
        the grid. Row-major, like the encoder's patches.
        """
        param = next(self.model.parameters(), None)
        if param is not None and param.device != images.device:
            self.model.to(images.device)
        if images.shape[-1] != self.img_size:
            images = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.img_size)
        features = self.model.forward_features(normalise_pixels(images, self.mean, self.std))
        fmap = feature_map(self.model, features, self.spec)
        return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def feature_map(model: nn.Module, features: torch.Tensor, spec: str = "the target network") -> torch.Tensor:
    """timm ``forward_features`` output as a (B, C, h, w) map: (B, T, C) tokens (prefix tokens dropped,
    a square number left) or a (B, C, H, W) / NHWC map."""
    if features.dim() == 4:
        return features.permute(0, 3, 1, 2) if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else features
    if features.dim() == 3:
        tokens = features[:, int(getattr(model, "num_prefix_tokens", 0)):]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"model.mcf_target={spec!r}: {tokens.shape[1]} patch tokens do not form a square grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    raise ValueError(f"model.mcf_target={spec!r}: forward_features gave a {features.dim()}-d tensor; expected "
                     "(B, T, C) tokens or a (B, C, H, W) feature map")


def load_target_network(spec: str) -> FrozenTargetNetwork:
    """The frozen target network ``spec`` names (see the module doc); ValueError naming
    ``model.mcf_target`` when it cannot be loaded."""
    try:
        if spec.startswith(TIMM_PREFIX):
            target = _timm_network(spec[len(TIMM_PREFIX):], spec)
        elif (Path(spec) / "config.json").is_file():
            target = _timm_network(f"local-dir:{spec}", spec)
        else:
            from pacofr.eval.encoders import load_encoder

            loaded = load_encoder(spec)
            target = FrozenTargetNetwork(loaded.model, loaded.img_size, loaded.mean, loaded.std, spec)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"model.mcf_target={spec!r} cannot be loaded as a frozen target network "
                         f"({type(err).__name__}: {err}); expected 'ema', '', a timm model folder, a pacofr run "
                         f"or checkpoint, random:PRESET or {TIMM_PREFIX}NAME") from err
    logger.info("MCF target network %s: %d-d features, %d px input", spec, target.num_features, target.img_size)
    return target


def _timm_network(name: str, spec: str) -> FrozenTargetNetwork:
    """``timm.create_model(name, pretrained=True)`` without a head, with its pretrained_cfg's input size and mean/std."""
    import timm

    model = timm.create_model(name, pretrained=True, num_classes=0)
    cfg = model.pretrained_cfg
    return FrozenTargetNetwork(model, int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), spec)
