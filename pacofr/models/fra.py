"""`FRA`: FRA-style pre-training (Facial Region Awareness; docs/method.md "Peer methods", ``method="fra"``).

One training forward, on two views of every face (the face itself and a copy warped by a known
random similarity transform, as ``sc="equivariance"`` makes its second view):

1. online branch per view: encoder on the whole view -> class token and patch features f (B, L, D);
   a per-patch projection z = patch_projector(f) (B, L, dm); the region heatmaps are the
   multi-candidate soft assignment of z to the K learned region (mask) embeddings,
   ``pacofr.ops.soft_assign(z, regions, m=K, tau=fra_tau, metric="cosine")`` (the fused kernels);
   region features = heatmap-weighted means of f (B, K, D); projector + predictor MLPs on the
   class token (global) and on each region feature (local);
2. momentum branch per view (no gradient): EMA encoder and EMA projection / regions / projectors,
   and the *balanced* assignment of its patches to the regions: Sinkhorn-Knopp
   (:func:`pacofr.models.peer_losses.sinkhorn`) from ``soft_assign`` at ``fra_sinkhorn_eps``;
3. ``L_global`` and ``L_local``: BYOL's ``2 - 2 cos`` between the online predictions of one view and
   the momentum projections of the other (region k against region k), both directions;
   ``L_cluster`` (the deep clustering of the mask embeddings): cross-entropy between the online
   heatmap of one view and the momentum branch's balanced assignment of the other view, warped
   into this view's frame with the known transform, where the other view covers it.

``L = w_fra_global L_global + w_fra_local L_local + w_fra_cluster L_cluster``. No decoder, no mask.
"""

from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models.codebook import Codebook
from pacofr.models.config import ModelConfig
from pacofr.models.consistency import invert_affine, make_teacher, random_similarity, warp
from pacofr.models.momentum import MLPHead, MomentumModel
from pacofr.models.output import ModelOutput
from pacofr.models.peer_losses import PROB_FLOOR, cosine_regression, sinkhorn, soft_cross_entropy
from pacofr.ops.precision import full_precision
from pacofr.models.vit import build_encoder, normalised_images
from pacofr.ops import soft_assign

logger = logging.getLogger(__name__)


class RegionEmbeddings(nn.Module):
    """K learnable facial-region mask embeddings, ``weight`` (K, dm) fp32, scored by cosine."""

    def __init__(self, num_regions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_regions, dim), dim=1))


@dataclass
class _View:
    """One view through one branch (online: with gradients and predictors; momentum: without)."""

    glob: torch.Tensor  # (B, P) class-token projection (online: + prediction)
    local: torch.Tensor  # (B, K, P) region projections (online: + prediction)
    heat: torch.Tensor  # (B, L, K) fp32 region heatmaps, rows summing to 1
    balanced: torch.Tensor | None = None  # (B, L, K) fp32 Sinkhorn targets (momentum branch)


def soft_region_pool(heat: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Heatmap-weighted mean feature of every region: heat (B, L, K), features (B, L, D) -> (B, K, D) fp32."""
    with full_precision(features.device):
        mass = heat.float().sum(dim=1).clamp_min(1e-6)  # (B, K)
        return torch.einsum("blk,bld->bkd", heat.float(), features.float()) / mass.unsqueeze(-1)


def into_view(maps: torch.Tensor, theta: torch.Tensor, grid: int, min_overlap: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch distributions of one view resampled into another view's frame.

    ``maps`` (B, L, K) on a ``grid`` x ``grid`` patch grid; the result at u is ``maps`` at
    ``theta u`` (:func:`pacofr.models.consistency.warp`), renormalised by the coverage there.
    Returns the aligned maps (B, L, K) fp32 and (B, L) fp32 weights: 1 where the coverage is at
    least ``min_overlap``, else 0.
    """
    batch, length, k = maps.shape
    with full_precision(maps.device):
        spatial = maps.float().transpose(1, 2).reshape(batch, k, grid, grid)
        coverage = warp(torch.ones_like(spatial[:, :1]), theta.float())
        aligned = warp(spatial, theta.float()) / coverage.clamp_min(PROB_FLOOR)
        covered = (coverage >= min_overlap).float().reshape(batch, length)
        return aligned.reshape(batch, k, length).transpose(1, 2), covered


def region_colours(num_regions: int) -> torch.Tensor:
    """(K, 3) fp32 distinct colours in [0, 1] (evenly spaced hues) for region maps."""
    return torch.tensor([colorsys.hsv_to_rgb(k / num_regions, 0.85, 1.0) for k in range(num_regions)])


class FRA(MomentumModel):
    """FRA-style model (``cfg.method="fra"``).

    Submodules: ``encoder`` (timm VisionTransformer, exportable as is), ``teacher`` (its EMA),
    ``global_projector`` / ``local_projector`` (D -> peer_hidden_dim -> peer_proj_dim),
    ``global_predictor`` / ``local_predictor`` (peer_proj_dim -> peer_hidden_dim -> peer_proj_dim),
    ``patch_projector`` (D -> D -> fra_region_dim), ``regions`` (:class:`RegionEmbeddings`,
    fra_regions x fra_region_dim; no weight decay) and ``momentum`` (EMA copies of the projectors,
    the patch projection and the regions).
    """

    panel_rows: tuple[tuple[str, str], ...] = (("input", "original"), ("view", "second view"),
                                               ("regions", "learned regions"))
    no_decay_prefixes = ("regions.",)

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.method != "fra":
            raise ValueError(f"FRA needs cfg.method='fra', got {cfg.method!r}")
        cfg.validate()
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.teacher = make_teacher(self.encoder)
        dim, hidden, proj = cfg.embed_dim, cfg.peer_hidden_dim, cfg.peer_proj_dim
        self.global_projector = MLPHead(dim, hidden, proj)
        self.global_predictor = MLPHead(proj, hidden, proj)
        self.patch_projector = MLPHead(dim, dim, cfg.fra_region_dim)
        self.regions = RegionEmbeddings(cfg.fra_regions, cfg.fra_region_dim)
        self.local_projector = MLPHead(dim, hidden, proj)
        self.local_predictor = MLPHead(proj, hidden, proj)
        self._init_momentum()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("FRA: %.2fM trainable parameters, %d learned regions", trainable / 1e6, cfg.fra_regions)

    def online_heads(self) -> dict[str, nn.Module]:
        """The heads with a momentum copy: both projectors, the patch projection and the regions."""
        return {"global_projector": self.global_projector, "patch_projector": self.patch_projector,
                "regions": self.regions, "local_projector": self.local_projector}

    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool = False,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = cfg.img_size.
            region_ids: (B, L) int64 (checked; FRA learns its own regions and does not read them).
            incubation: ignored (FRA has no incubation stage).
            generator: torch.Generator for the second view's similarity transforms.

        Returns:
            :class:`ModelOutput`: ``losses`` ``global``, ``local``, ``cluster`` (unweighted);
            ``stats`` ``region_perplexity`` (effective number of regions the batch-mean heatmap
            uses, 1 to K), ``region_confidence`` (mean over patches of the largest heatmap value,
            1/K to 1) and ``view_overlap`` (fraction of patches the other view covers).
        """
        del incubation
        self._check_inputs(images, region_ids)
        cfg = self.cfg
        theta, second = self._second_view(images, generator)
        online = [self._branch(view, online=True) for view in (images, second)]
        with torch.no_grad():
            target = [self._branch(view, online=False) for view in (images, second)]
            # view 2 at u shows view 1 at theta u: theta^-1 brings view 2's maps into view 1's frame
            into_first, cover_first = into_view(target[1].balanced, invert_affine(theta.float()), cfg.grid_size,
                                                cfg.eq_min_overlap)
            into_second, cover_second = into_view(target[0].balanced, theta, cfg.grid_size, cfg.eq_min_overlap)
        terms = {
            "global": ((cosine_regression(online[0].glob, target[1].glob)
                        + cosine_regression(online[1].glob, target[0].glob)) / 2, cfg.w_fra_global),
            "local": ((cosine_regression(online[0].local, target[1].local)
                       + cosine_regression(online[1].local, target[0].local)) / 2, cfg.w_fra_local),
            "cluster": ((soft_cross_entropy(into_first, online[0].heat, cover_first)
                         + soft_cross_entropy(into_second, online[1].heat, cover_second)) / 2, cfg.w_fra_cluster),
        }
        loss = sum(weight * value for value, weight in terms.values())
        heat = online[0].heat.detach()
        stats = {"region_perplexity": Codebook.perplexity(heat), "region_confidence": heat.amax(dim=-1).mean(),
                 "view_overlap": cover_first.mean()}
        return ModelOutput(loss=loss, losses={name: value.detach() for name, (value, _) in terms.items()}, stats=stats)

    def loss_names(self) -> tuple[str, ...]:
        """Every loss name :meth:`forward` reports."""
        return ("global", "local", "cluster")

    def stat_names(self) -> tuple[str, ...]:
        """Every stat name :meth:`forward` reports."""
        return ("region_perplexity", "region_confidence", "view_overlap")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, region_ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Panels for the run's picture grid (:attr:`panel_rows`), all (B, 3, S, S) fp32 in [0, 1]:
        "input", "view" (the second view) and "regions" (each patch tinted with the colour of the
        region its online heatmap ranks first). Eval mode (restored afterwards); no losses."""
        self._check_inputs(images, region_ids)
        was_training = self.training
        self.eval()
        try:
            cfg = self.cfg
            _, second = self._second_view(images, generator)
            heat = self._branch(images, online=True).heat  # (B, L, K)
            colours = region_colours(cfg.fra_regions).to(images.device)[heat.argmax(dim=-1)]  # (B, L, 3)
            grid, p = cfg.grid_size, cfg.patch_size
            tint = colours.view(-1, grid, grid, 3).permute(0, 3, 1, 2).repeat_interleave(p, 2).repeat_interleave(p, 3)
            return {"input": images.float().clamp(0, 1), "view": second.float().clamp(0, 1),
                    "regions": (0.5 * images.float() + 0.5 * tint).clamp(0, 1)}
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------
    def _second_view(self, images: torch.Tensor, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random similarity ``theta`` (B, 2, 3) and ``warp(images, theta)`` (zeros outside)."""
        cfg = self.cfg
        theta = random_similarity(images.shape[0], cfg.eq_max_rotation, cfg.eq_max_scale, cfg.eq_max_shift,
                                  generator, images.device)
        with torch.no_grad(), full_precision(images.device):
            return theta, warp(images.float(), theta).to(images.dtype)

    def _heatmap(self, z: torch.Tensor, regions: torch.Tensor, tau: float) -> torch.Tensor:
        """(B, L, K) fp32 softmax over all K regions of cos(z, region) / tau, by ``soft_assign``."""
        k = regions.shape[0]
        with full_precision(z.device):
            assignment = soft_assign(z.float(), regions.float(), k, tau, metric="cosine", backend=self.cfg.backend)
            dense = torch.zeros(*assignment.weights.shape[:-1], k, device=z.device, dtype=torch.float32)
            return dense.scatter(-1, assignment.indices, assignment.weights)

    def _branch(self, view: torch.Tensor, online: bool) -> _View:
        """One view through the online branch (with predictors) or the momentum branch (no
        predictors, plus the Sinkhorn-balanced assignment)."""
        cfg = self.cfg
        encoder = self.encoder if online else self.teacher
        heads = self.online_heads() if online else self.momentum.copies
        tokens = encoder.forward_features(normalised_images(view, cfg))
        patches = tokens[:, 1:]
        z = heads["patch_projector"](patches)
        regions = heads["regions"].weight
        heat = self._heatmap(z, regions, cfg.fra_tau)
        glob = heads["global_projector"](tokens[:, 0])
        local = heads["local_projector"](soft_region_pool(heat, patches).to(patches.dtype))
        if online:
            return _View(self.global_predictor(glob), self.local_predictor(local), heat)
        start = self._heatmap(z, regions, cfg.fra_sinkhorn_eps)
        balanced = sinkhorn(start.flatten(0, 1), cfg.fra_sinkhorn_iters).view_as(start)
        return _View(glob, local, heat, balanced)
