"""The encoder is a plain timm VisionTransformer; the MAE-style path reproduces timm's features."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from _tolerances import gamma
from timm.models.vision_transformer import VisionTransformer

from pacofr.models import ModelConfig, PaCoFR
from pacofr.models.vit import (
    add_positions,
    build_encoder,
    embed_patches,
    normalised_images,
    patch_embed_linear,
    run_encoder,
    sincos_pos_embed_2d,
)
from pacofr.ops import gather_patches

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES_ATOL = 2e-6
"""Bound between the encoder's features from gathered tokens and timm's forward_features (or a shuffled
token order), both fp32: attention and the blocks sum in another order, so no useful worst case. Measured over 60
seeds of the tiny encoder on the CPU: the same order exact, a shuffled order at most 4.8e-7 apart (outputs
of magnitude <= 4.2, after the final LayerNorm); the bound is 4x that."""


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_encoder_state_dict_loads_into_timm(preset: str, generator: torch.Generator) -> None:
    cfg = ModelConfig.preset(preset)
    model = PaCoFR(cfg)
    with torch.no_grad():  # move every weight away from its initial value
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    assert type(model.encoder) is VisionTransformer
    fresh = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs())
    fresh.load_state_dict(model.encoder.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=generator)
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), model.encoder.forward_features(x))
        assert torch.equal(fresh(x), model.encoder(x))


def test_patch_embed_linear_matches_the_conv(generator: torch.Generator) -> None:
    cfg = ModelConfig.preset("tiny")
    encoder = build_encoder(cfg)
    images = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=generator)
    conv = encoder.patch_embed(images)  # (B, L, D)
    ids = torch.arange(cfg.num_patches).expand(2, -1)
    patches = gather_patches(images, ids, cfg.patch_size)
    weight, bias = patch_embed_linear(encoder)
    assert weight.shape == (cfg.embed_dim, cfg.patch_dim)
    # two fp32 evaluations of the same dot of patch_dim products plus the bias, each within
    # gamma(patch_dim + 1) of sum |w x| + |b| (measured: bit-identical on the CPU)
    bound = 2 * gamma(cfg.patch_dim + 1) * (patches.abs() @ weight.abs().T + bias.abs())
    assert ((F.linear(patches, weight, bias) - conv).abs() <= bound).all()


def test_gathered_tokens_reproduce_timm_features(generator: torch.Generator) -> None:
    """All patches through gather + linear embed + positions + blocks == timm's forward_features,
    and a shuffled token order gives the same features, shuffled (positions follow the ids)."""
    cfg = ModelConfig.preset("tiny", encoder_pos="learned")
    encoder = build_encoder(cfg).eval()
    with torch.no_grad():
        encoder.pos_embed.add_(0.1 * torch.randn(encoder.pos_embed.shape, generator=generator))
    images = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=generator)
    reference = encoder.forward_features(normalised_images(images, cfg))

    def features(ids: torch.Tensor) -> torch.Tensor:
        patches = gather_patches(images, ids, cfg.patch_size, mean=cfg.pixel_mean, std=cfg.pixel_std)
        return run_encoder(encoder, add_positions(encoder, embed_patches(encoder, patches), ids))

    ids = torch.arange(cfg.num_patches).expand(2, -1)
    assert torch.allclose(features(ids), reference, rtol=0, atol=FEATURES_ATOL)
    shuffled = torch.stack([torch.randperm(cfg.num_patches, generator=generator) for _ in range(2)])
    out = features(shuffled)
    assert torch.allclose(out[:, 0], reference[:, 0], rtol=0, atol=FEATURES_ATOL)
    expected = torch.gather(reference[:, 1:], 1, shuffled.unsqueeze(-1).expand(-1, -1, cfg.embed_dim))
    assert torch.allclose(out[:, 1:], expected, rtol=0, atol=FEATURES_ATOL)


def test_sincos_positions() -> None:
    pos = sincos_pos_embed_2d(16, 4).view(4, 4, 16)
    assert pos.dtype == torch.float32
    # first half encodes the column, second half the row
    assert torch.equal(pos[0, :, :8], pos[3, :, :8]) and not torch.equal(pos[:, 0, :8], pos[:, 1, :8])
    assert torch.equal(pos[:, 0, 8:], pos[:, 3, 8:]) and not torch.equal(pos[0, :, 8:], pos[1, :, 8:])
    assert torch.equal(pos[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4)), "sin 0, cos 0: exact"
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(10, 4)


@pytest.mark.parametrize("encoder_pos", ["fixed", "learned"])
def test_encoder_positions(encoder_pos: str) -> None:
    cfg = ModelConfig.preset("tiny", encoder_pos=encoder_pos)
    encoder = build_encoder(cfg)
    assert encoder.pos_embed.requires_grad == (encoder_pos == "learned")
    assert torch.equal(encoder.pos_embed[0, 0], torch.zeros(cfg.embed_dim))
    assert torch.equal(encoder.pos_embed[0, 1:], sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size))


def test_unsupported_timm_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="VisionTransformer"):  # ValueError: the CLI's one-line error
        build_encoder(ModelConfig.preset("tiny", timm_name="resnet18"))
    with pytest.raises(ValueError, match="timm_name='not_a_model' is not a timm model"):
        build_encoder(ModelConfig.preset("tiny", timm_name="not_a_model"))
    with pytest.raises(ValueError, match="distillation"):
        build_encoder(ModelConfig.preset("tiny", timm_name="deit_tiny_distilled_patch16_224"))
