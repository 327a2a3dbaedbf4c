"""The encoder: a plain timm ``VisionTransformer`` run MAE-style on a subset of tokens.

The module itself stays an unmodified timm model (so ``encoder.state_dict()`` loads into
``timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs())``); the functions here
drive its parts: the Conv2d patch embedding applied as a linear map to gathered (p, q, c) patch
vectors, positions added to an arbitrary subset of tokens, then class token, blocks and norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pacofr.models.config import ModelConfig


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE): (grid * grid, dim) fp32, row-major patches.

    The first half of the channels encodes the column (x), the second half the row (y); each half
    is ``[sin(pos * w), cos(pos * w)]`` with ``w = 1 / 10000 ** (i / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def build_encoder(cfg: ModelConfig) -> VisionTransformer:
    """A timm VisionTransformer (class token, no head) with MAE's sin-cos positions.

    ``cfg.encoder_pos="fixed"`` freezes the positions (requires_grad False), "learned" trains them
    from the sin-cos initialisation. The class-token position is zero.
    """
    if not timm.is_model(cfg.timm_name):
        raise ValueError(f"model.timm_name={cfg.timm_name!r} is not a timm model; expected a timm "
                         "VisionTransformer such as vit_base_patch16_224 (see timm.list_models('vit_*'))")
    try:
        encoder = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs())
    except TypeError as err:
        raise ValueError(f"timm_name={cfg.timm_name!r} must name a timm VisionTransformer taking "
                         f"{sorted(cfg.timm_kwargs())}: {err}") from err
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"timm_name={cfg.timm_name!r} must name a timm VisionTransformer, got {type(encoder).__name__}")
    if encoder.cls_token is None or encoder.num_prefix_tokens != 1 or encoder.no_embed_class:
        raise ValueError(f"timm_name={cfg.timm_name!r}: the encoder needs a class token with its own position "
                         "and no other prefix (register, distillation) tokens")
    if not isinstance(encoder.patch_embed.norm, nn.Identity) or encoder.dynamic_img_size:
        raise ValueError(f"timm_name={cfg.timm_name!r}: patch-embedding norms and dynamic image sizes are not supported")
    grid = cfg.grid_size
    with torch.no_grad():
        encoder.pos_embed.zero_()
        encoder.pos_embed[0, 1:].copy_(sincos_pos_embed_2d(cfg.embed_dim, grid))
    encoder.pos_embed.requires_grad_(cfg.encoder_pos == "learned")
    return encoder


def patch_embed_linear(encoder: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Conv2d patch embedding as a linear map on (p, q, c)-ordered patch vectors.

    Returns ``weight`` (D, P) and ``bias`` (D,) such that
    ``F.linear(patch_vector, weight, bias) == conv(image)`` at that patch; the Conv2d weight is
    (D, C, p, q), so it is permuted to (D, p, q, C) before flattening. Differentiable (a view of
    the conv parameters).
    """
    proj = encoder.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)
    return weight, proj.bias


def embed_patches(encoder: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """(B, n, P) normalised pixel patches -> (B, n, D) patch tokens (no position)."""
    weight, bias = patch_embed_linear(encoder)
    return F.linear(patches, weight, bias)


def patch_positions(encoder: VisionTransformer) -> torch.Tensor:
    """(L, D) positions of the patch tokens (the class-token slot removed)."""
    return encoder.pos_embed[0, 1:]


def add_positions(encoder: VisionTransformer, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, n, D) + the positions of patches ``ids`` (B, n)."""
    pos = patch_positions(encoder)
    return tokens + pos[ids].to(tokens.dtype)


def run_encoder(encoder: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Class token + patch tokens (B, n, D, positions already added) through the encoder.

    Mirrors ``VisionTransformer.forward_features`` after its patch embedding: prepend
    ``cls_token + pos_embed[0, 0]``, position dropout, ``patch_drop``, ``norm_pre``, the blocks
    (with gradient checkpointing when the encoder has it on), final norm. Returns (B, 1 + n, D).
    """
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
    x = encoder.pos_drop(torch.cat([cls, tokens], dim=1))
    x = encoder.norm_pre(encoder.patch_drop(x))
    if encoder.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(encoder.blocks, x)
    else:
        x = encoder.blocks(x)
    return encoder.norm(x)


def normalise_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) images in [0, 1] -> ``(images - mean) / std`` per channel, in the images' dtype."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def normalised_images(images: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, 3, S, S) images in [0, 1] -> (images - pixel_mean) / pixel_std (the encoder input)."""
    return normalise_pixels(images, cfg.pixel_mean, cfg.pixel_std)

