"""Spatial consistency between facial parts (method.md "Spatial consistency").

- ``layout`` (the earlier default): the relative layout of the facial regions. Each region's centroid comes
  from the image's own region map (landmark-driven, so it follows the face's pose and the
  augmentation); a :class:`LayoutHead` on the encoder's mean-pooled kept tokens predicts every
  pairwise offset ``c_h - c_g`` (in units of the image side). Both the predictions and the targets
  are centred on their batch mean, so only how each face's layout differs from the others' counts
  (pose, shape, the augmentation's rotation and scale), and the squared error is normalised per
  pair by the offset's variance over the batch (floor ``(1 / (4 grid))^2``): about 1 for a head
  that predicts the same layout for every face, 0 for an exact one. No teacher.
- EMA teacher of the encoder (:func:`make_teacher`, :func:`ema_update`) that sees the full image.
- ``relation`` (default): region-pool student and teacher features, compare the G x G cosine relation
  matrices (``||A_s - A_t||_F^2`` averaged over the region pairs present in the image, = / G^2
  when all G regions are present) plus ``beta * (1 - cos)`` between student and teacher features
  at the masked patches.
- ``equivariance``: the teacher sees a second view related to the first by a known random
  similarity transform; its feature map is warped back into the first view's frame
  (``affine_grid`` / ``grid_sample``) and matched to the student's by cosine where it covers.

All of it runs in fp32 with autocast off.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models.config import ModelConfig
from pacofr.models.masking import MaskSets
from pacofr.models.vit import normalised_images
from pacofr.ops.precision import full_precision


def make_teacher(encoder: nn.Module) -> nn.Module:
    """A frozen copy of ``encoder`` (no gradients, eval mode) to be updated by :func:`ema_update`."""
    teacher = copy.deepcopy(encoder)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter (buffers copied)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def region_pool(features: torch.Tensor, region_ids: torch.Tensor, num_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each region.

    Args:
        features: (B, L, D) patch features (any float dtype).
        region_ids: (B, L) int64 in [0, num_regions).

    Returns:
        pooled (B, G, D) fp32 (zero for an absent region) and counts (B, G) fp32.
    """
    onehot = F.one_hot(region_ids, num_regions).float()  # (B, L, G)
    counts = onehot.sum(dim=1)
    pooled = torch.einsum("blg,bld->bgd", onehot, features.float()) / counts.clamp_min(1.0).unsqueeze(-1)
    return pooled, counts


def relation_matrix(pooled: torch.Tensor) -> torch.Tensor:
    """(B, G, D) region features -> (B, G, G) cosine similarities (fp32)."""
    unit = F.normalize(pooled.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, region_ids: torch.Tensor, num_regions: int,
                  ids_masked: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_sc for ``sc="relation"``.

    Args:
        student: (B, L, D) student features (decoder hidden states projected to D).
        teacher: (B, L, D) teacher features of the full image (no gradient needed).
        region_ids: (B, L) int64 region of every patch.
        ids_masked: (B, n_mask) masked patches, where the feature-matching term applies.
        beta: weight of the (1 - cos) term.

    Returns:
        the fp32 scalar loss and its detached parts {"sc_relation", "sc_cos"}.
    """
    with full_precision(student.device):
        pooled_s, counts = region_pool(student, region_ids, num_regions)
        pooled_t, _ = region_pool(teacher.detach(), region_ids, num_regions)
        present = counts > 0
        pairs = (present.unsqueeze(2) & present.unsqueeze(1)).float()
        diff = (relation_matrix(pooled_s) - relation_matrix(pooled_t)).square()
        relation = (diff * pairs).sum() / pairs.sum().clamp_min(1.0)
        if ids_masked.shape[1]:
            index = ids_masked.unsqueeze(-1).expand(-1, -1, student.shape[-1])
            s_masked = torch.gather(student.float(), 1, index)
            t_masked = torch.gather(teacher.detach().float(), 1, index)
            cos_term = (1.0 - F.cosine_similarity(s_masked, t_masked, dim=-1)).mean()
        else:
            cos_term = student.float().sum() * 0.0
        loss = relation + beta * cos_term
    return loss, {"sc_relation": relation.detach(), "sc_cos": cos_term.detach()}


def region_centroids(region_ids: torch.Tensor, grid: int, num_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of each region's patch centres, (x, y) in units of the image side, and presence.

    Args:
        region_ids: (B, L) int64 region ids of a row-major ``grid`` x ``grid`` patch grid.
    Returns:
        centroids (B, G, 2) fp32 (0 for an absent region) and present (B, G) bool.
    """
    cells = torch.arange(grid * grid, device=region_ids.device)
    coords = torch.stack([cells % grid, cells // grid], dim=-1).float().add(0.5).div(grid)  # (L, 2)
    centroids, counts = region_pool(coords.expand(region_ids.shape[0], -1, -1), region_ids, num_regions)
    return centroids, counts > 0


class LayoutHead(nn.Module):
    """MLP from a pooled feature (B, D) to the offsets (B, n_pairs, 2) of every region pair g < h.

    Buffer ``pairs`` (2, n_pairs) int64: the (g, h) of each output row (``torch.triu_indices``).
    """

    def __init__(self, dim: int, num_regions: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("pairs", torch.triu_indices(num_regions, num_regions, 1), persistent=False)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * self.pairs.shape[1]))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, D) -> predicted offsets (B, n_pairs, 2) in the input's dtype."""
        return self.net(pooled).view(pooled.shape[0], -1, 2)


def layout_loss(predicted: torch.Tensor, region_ids: torch.Tensor, pairs: torch.Tensor, grid: int,
                num_regions: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_sc for ``sc="layout"``: variance-normalised squared error of the predicted region offsets.

    Args:
        predicted: (B, n_pairs, 2) offsets ``c_h - c_g`` for the pairs (g, h) in ``pairs`` (2, n_pairs).
        region_ids: (B, L) region map of each image (the targets come from it).
    Returns:
        the fp32 scalar loss (mean over present pairs and both coordinates of
        ``(pred - mean(pred) - (target - mean(target)))^2 / (batch variance + (1 / (4 grid))^2)``,
        means and variances over the images where the pair is present) and {"sc_layout": it, detached}.
    """
    with full_precision(predicted.device):
        centroids, present = region_centroids(region_ids, grid, num_regions)
        target = centroids[:, pairs[1]] - centroids[:, pairs[0]]  # (B, n_pairs, 2)
        valid = (present[:, pairs[0]] & present[:, pairs[1]]).float().unsqueeze(-1)
        count = valid.sum(dim=0).clamp_min(1.0)

        def centred(x: torch.Tensor) -> torch.Tensor:
            return x - (x * valid).sum(dim=0) / count

        target, predicted = centred(target), centred(predicted.float())
        variance = (target.square() * valid).sum(dim=0) / count
        error = (predicted - target).square() / (variance + (0.25 / grid) ** 2)
        loss = (error * valid).sum() / (2.0 * valid.sum()).clamp_min(1.0)
    return loss, {"sc_layout": loss.detach()}


def random_similarity(batch: int, max_rotation_deg: float, max_scale: float, max_shift: float,
                      generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 2, 3) fp32 ``affine_grid`` matrices of random similarity transforms.

    Rotation uniform in +-max_rotation_deg, scale uniform in [1 - max_scale, 1 + max_scale],
    shift uniform in +-max_shift of the image size (normalised coordinates span 2).
    """
    where = generator.device if generator is not None else device
    u = (torch.rand(batch, 4, generator=generator, device=where).to(device) * 2.0 - 1.0)
    angle = u[:, 0] * math.radians(max_rotation_deg)
    scale = 1.0 + u[:, 1] * max_scale
    shift = u[:, 2:] * (2.0 * max_shift)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1),
                        torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of (B, 2, 3) affine maps u -> A u + t: (A^-1, -A^-1 t)."""
    inverse = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([inverse, -(inverse @ theta[:, :, 2:])], dim=2)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) so that output(u) = x(theta u) in normalised coordinates (zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def equivariance_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, theta: torch.Tensor,
                      min_overlap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_sc for ``sc="equivariance"``.

    The teacher saw view 2 = ``warp(view 1, theta)``, so its feature at u describes view 1 at
    theta u; warping its map by theta^-1 brings it into view 1's frame.

    Args:
        student_map: (B, D, g, g) student features of view 1.
        teacher_map: (B, D, g, g) teacher features of view 2 (no gradient needed).
        theta: (B, 2, 3) the transform that made view 2.
        min_overlap: a position counts when the warped coverage is at least this.

    Returns:
        mean (1 - cos) over covered positions (fp32 scalar; 0 with none) and
        {"sc_overlap": covered fraction}.
    """
    with full_precision(student_map.device):
        back = invert_affine(theta.float())
        aligned = warp(teacher_map.detach().float(), back)
        ones = torch.ones_like(teacher_map[:, :1], dtype=torch.float32)
        covered = (warp(ones, back) >= min_overlap).squeeze(1)  # (B, g, g)
        cos = F.cosine_similarity(student_map.float(), aligned, dim=1)
        weight = covered.float()
        loss = ((1.0 - cos) * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, {"sc_overlap": weight.mean().detach()}


def teacher_features(teacher: nn.Module, images: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, L, D) patch features of the (EMA) ``teacher`` encoder for full ``images`` (B, 3, S, S) in
    [0, 1] (no gradient)."""
    with torch.no_grad():
        return teacher.forward_features(normalised_images(images, cfg))[:, 1:]


def spatial_consistency_loss(cfg: ModelConfig, images: torch.Tensor, region_ids: torch.Tensor, masks: MaskSets,
                             latent: torch.Tensor, hidden: torch.Tensor, generator: torch.Generator | None,
                             stats: dict[str, torch.Tensor], *, layout_head: LayoutHead | None,
                             sc_proj: nn.Module | None, teacher: nn.Module | None) -> torch.Tensor:
    """L_sc (0-d fp32) per ``cfg.sc``: the region layout predicted by ``layout_head`` from the encoder
    output ``latent``'s kept tokens, or the relation / equivariance of the decoder's ``hidden``
    states projected by ``sc_proj`` against the ``teacher``'s features. Parts go into ``stats``."""
    if cfg.sc == "layout":
        kept = latent[:, 1:]
        if cfg.encoder_mask == "mask_token":
            kept = torch.gather(kept, 1, masks.ids_keep.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))
        predicted = layout_head(kept.mean(dim=1))
        loss, parts = layout_loss(predicted, region_ids, layout_head.pairs, cfg.grid_size, cfg.num_regions)
        stats.update(parts)
        return loss
    student = sc_proj(hidden[:, 1:])  # (B, L, D)
    if cfg.sc == "relation":
        loss, parts = relation_loss(student, teacher_features(teacher, images, cfg), region_ids, cfg.num_regions,
                                    masks.ids_masked, cfg.sc_beta)
    else:
        batch, grid = images.shape[0], cfg.grid_size
        theta = random_similarity(batch, cfg.eq_max_rotation, cfg.eq_max_scale, cfg.eq_max_shift,
                                  generator, images.device)
        with torch.no_grad(), full_precision(images.device):
            view = warp(images.float(), theta)
        teacher = teacher_features(teacher, view, cfg)

        def as_map(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, -1, grid, grid)

        loss, parts = equivariance_loss(as_map(student), as_map(teacher), theta, cfg.eq_min_overlap)
    stats.update(parts)
    return loss
