"""Structured facial-region masking (method.md "Structured facial-region masking").

Every patch of every image falls in exactly one of three disjoint sets, with the same sizes in
every image of a batch (so batches stay dense):

- **masked** (n_mask): dropped from the encoder, reconstructed by the decoder;
- **replaced** (n_rep): enter the encoder as a codebook token predicted from their own pixels;
- **visible** (the rest): enter the encoder as pixel patches.

Mask modes: ``region`` masks whole facial regions: the regions present in the image are put in a
uniformly random order and masked one after the other, whole, until n_mask patches are masked;
the region that crosses the budget is masked partially (a uniform subset of it), so every patch
but those of one region belongs to a whole masked region. Every patch belongs to a region (the
region map covers the periphery too, :mod:`pacofr.data.regions`), so region sampling fills the
whole budget; a region named ``other_region`` is never ordered and only completes the budget.
``random`` draws n_mask patches uniformly; ``block`` masks one contiguous block: the n_mask patches
nearest (in a random-aspect L-infinity distance) to a random centre.

The replaced set comes from the patches left visible (``visible``), from the structured mask
(``masked``: n_rep of the n_mask masked patches become replaced, leaving n_mask - n_rep masked),
or from all patches before masking (``all``: n_rep patches drawn uniformly first, the mask is
then drawn among the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pacofr.ops.checks import check_choice, check_int, check_tensor

if TYPE_CHECKING:  # imported for annotations only: pacofr.models imports this module
    from pacofr.models.config import ModelConfig

BLOCK_MIN_ASPECT = 0.3  # block mode: aspect ratio drawn log-uniformly in [0.3, 1 / 0.3] (BEiT)

_VISIBLE, _REPLACED, _MASKED = 0, 1, 2


@dataclass(frozen=True)
class MaskSpec:
    """What to sample: the mode and the set sizes for images of ``num_patches`` patches."""

    mode: str  # "region" | "random" | "block"
    num_patches: int  # L
    n_mask: int
    n_rep: int
    replace_from: str = "visible"  # "visible" | "masked" | "all"
    num_regions: int = 14
    other_region: int = -1

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "MaskSpec":
        """The spec of ``cfg`` (MAE-face control: random ``mae_mask_ratio`` mask, nothing replaced;
        nothing is replaced either without the codebook, ``codebook=False``).

        With ``replace_from="masked"`` n_mask counts the structured mask before replacement, so
        ``n_mask - n_rep`` patches stay masked.
        """
        length = cfg.num_patches
        if not cfg.is_paco:
            return cls("random", length, round(cfg.mae_mask_ratio * length), 0)
        n_rep = round(cfg.r_rep * length) if cfg.codebook else 0
        return cls(cfg.mask_mode, length, round(cfg.r_mask * length), n_rep, cfg.replace_from, cfg.num_regions,
                   cfg.other_region)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("region", "random", "block"))
        check_choice("replace_from", self.replace_from, ("visible", "masked", "all"))
        check_int("num_patches", self.num_patches, low=1)
        check_int("n_mask", self.n_mask, low=0, high=self.num_patches)
        check_int("n_rep", self.n_rep, low=0, high=self.num_patches)
        if self.replace_from == "masked":
            if self.n_rep > self.n_mask:
                raise ValueError(f"replace_from='masked' needs n_rep={self.n_rep} <= n_mask={self.n_mask}")
        elif self.n_mask + self.n_rep > self.num_patches:
            raise ValueError(f"n_mask={self.n_mask} + n_rep={self.n_rep} exceed num_patches={self.num_patches}")

    @property
    def num_masked(self) -> int:
        """Patches dropped from the encoder."""
        return self.n_mask - self.n_rep if self.replace_from == "masked" else self.n_mask

    @property
    def num_keep(self) -> int:
        """Patches entering the encoder (visible + replaced)."""
        return self.num_patches - self.num_masked


@dataclass
class MaskSets:
    """Disjoint patch sets of a batch; all index tensors are int64 on the region ids' device.

    Attributes:
        ids_visible: (B, n_vis) pixel patches fed to the encoder, ascending.
        ids_replaced: (B, n_rep) patches fed as codebook tokens, ascending.
        ids_masked: (B, n_mask) patches dropped from the encoder, ascending.
        ids_keep: (B, n_vis + n_rep) = cat(ids_visible, ids_replaced): the encoder token order.
        ids_restore: (B, L) inverse permutation of cat(ids_keep, ids_masked) (MAE unshuffle):
            position l of the image holds token ``ids_restore[b, l]`` of that concatenation.
        whole_regions: (B, G) bool, regions present in the image whose every patch is in the
            structured mask (the masked patches, and with ``replace_from="masked"`` the replaced
            ones too); all False outside region mode.
    """

    ids_visible: torch.Tensor
    ids_replaced: torch.Tensor
    ids_masked: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    whole_regions: torch.Tensor

    @property
    def num_patches(self) -> int:
        """L."""
        return self.ids_restore.shape[1]

    def membership(self) -> torch.Tensor:
        """(B, L) int64: 0 visible, 1 replaced, 2 masked."""
        labels = torch.zeros_like(self.ids_restore)
        labels.scatter_(1, self.ids_replaced, _REPLACED)
        labels.scatter_(1, self.ids_masked, _MASKED)
        return labels

    @property
    def mask(self) -> torch.Tensor:
        """(B, L) bool, True at masked patches."""
        return self.membership() == _MASKED

    @property
    def replaced(self) -> torch.Tensor:
        """(B, L) bool, True at replaced patches."""
        return self.membership() == _REPLACED


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) fp32 drawn on the generator's device (or ``device`` without one)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _region_counts(region_ids: torch.Tensor, num_regions: int, members: torch.Tensor | None = None) -> torch.Tensor:
    """(B, G) fp32 patches of each region (only those where ``members`` (B, L) bool is True)."""
    batch, length = region_ids.shape
    ones = torch.ones(batch, length, device=region_ids.device) if members is None else members.float()
    counts = torch.zeros(batch, num_regions, device=region_ids.device)
    return counts.scatter_add_(1, region_ids, ones)


def _region_priority(region_ids: torch.Tensor, spec: MaskSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Priorities (B, L): every patch of the region ranked r-th in a random order of the regions
    present gets ``G - r + u`` (u uniform in [0, 1)), so the n_mask highest are whole regions in that
    order and a uniform part of the region that crosses the budget; ``other_region`` ranks last."""
    batch, length = region_ids.shape
    device = region_ids.device
    present = _region_counts(region_ids, spec.num_regions) > 0
    key = _uniform((batch, spec.num_regions), generator, device)
    if spec.other_region >= 0:
        key[:, spec.other_region] = -1.0
    key = torch.where(present, key, -2.0)
    rank = torch.argsort(torch.argsort(key, dim=1, descending=True), dim=1)  # 0 = masked first
    patch_rank = torch.gather(rank, 1, region_ids).float()
    return (spec.num_regions - patch_rank) + _uniform((batch, length), generator, device)


def _block_priority(batch: int, length: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Priorities (B, L) highest near a random centre, in an L-infinity distance of random aspect."""
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"block masking needs a square patch grid, got L={length} patches")
    rows = torch.arange(length, device=device) // side
    cols = torch.arange(length, device=device) % side
    centre = _uniform((batch, 2), generator, device) * side - 0.5
    log_aspect = (_uniform((batch,), generator, device) * 2 - 1) * math.log(1 / BLOCK_MIN_ASPECT)
    aspect = torch.exp(log_aspect / 2).unsqueeze(1)
    distance = torch.maximum((rows - centre[:, :1]).abs() / aspect, (cols - centre[:, 1:]).abs() * aspect)
    return -distance + 1e-3 * _uniform((batch, length), generator, device)


def _top(priority: torch.Tensor, count: int) -> torch.Tensor:
    """(B, L) bool marking the ``count`` highest priorities of each row."""
    chosen = torch.zeros(priority.shape, dtype=torch.bool, device=priority.device)
    if count:
        chosen.scatter_(1, priority.topk(count, dim=1).indices, True)
    return chosen


def sample_masks(region_ids: torch.Tensor, cfg: ModelConfig | MaskSpec,
                 generator: torch.Generator | None = None, *, validate: bool = True) -> MaskSets:
    """Sample the masked / replaced / visible sets of a batch.

    Args:
        region_ids: (B, L) integer region id of every patch (row-major grid), in [0, num_regions).
            Only region mode reads the values; the other modes use the shape.
        cfg: a :class:`ModelConfig` (its mask flags; MAE control when ``method="mae"``) or a
            :class:`MaskSpec`.
        generator: torch.Generator for reproducible masks (any device; numbers are drawn there
            and moved to the region ids' device). None: the global RNG of that device.
        validate: check the range of ``region_ids`` (one device->host sync).

    Returns:
        :class:`MaskSets` with the same set sizes for every image.
    """
    region_ids = check_tensor("region_ids", region_ids, ndim=2,
                              dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8)).long()
    batch, length = region_ids.shape
    spec = cfg if isinstance(cfg, MaskSpec) else MaskSpec.from_config(cfg)
    if spec.num_patches != length:
        raise ValueError(f"region_ids has L={length} patches per image but the mask spec expects {spec.num_patches}")
    if validate and spec.mode == "region" and region_ids.numel():
        low, high = int(region_ids.min()), int(region_ids.max())
        if low < 0 or high >= spec.num_regions:
            raise ValueError(f"region_ids must be in [0, {spec.num_regions}), got values in [{low}, {high}]")
    device = region_ids.device

    if spec.mode == "region":
        priority = _region_priority(region_ids, spec, generator)
    elif spec.mode == "block":
        priority = _block_priority(batch, length, generator, device)
    else:
        priority = _uniform((batch, length), generator, device)

    rep_key = _uniform((batch, length), generator, device)
    if spec.replace_from == "all":
        replaced = _top(rep_key, spec.n_rep)
        masked = _top(priority.masked_fill(replaced, -math.inf), spec.n_mask)
    elif spec.replace_from == "visible":
        masked = _top(priority, spec.n_mask)
        replaced = _top(rep_key.masked_fill(masked, -math.inf), spec.n_rep)
    else:  # "masked": part of the structured mask enters the encoder as codebook tokens
        structured = _top(priority, spec.n_mask)
        replaced = _top(rep_key.masked_fill(~structured, -math.inf), spec.n_rep)
        masked = structured & ~replaced

    if spec.replace_from != "masked":
        structured = masked
    whole = torch.zeros(batch, spec.num_regions, dtype=torch.bool, device=device)
    if spec.mode == "region":
        counts = _region_counts(region_ids, spec.num_regions)
        whole = (counts > 0) & (_region_counts(region_ids, spec.num_regions, structured) == counts)
    membership = torch.where(masked, _MASKED, torch.where(replaced, _REPLACED, _VISIBLE))  # no host sync
    position = torch.arange(length, device=device)
    ids_shuffle = torch.argsort(membership * length + position, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_vis = length - spec.num_masked - spec.n_rep
    n_keep = spec.num_keep
    return MaskSets(ids_visible=ids_shuffle[:, :n_vis].contiguous(),
                    ids_replaced=ids_shuffle[:, n_vis:n_keep].contiguous(),
                    ids_masked=ids_shuffle[:, n_keep:].contiguous(), ids_keep=ids_shuffle[:, :n_keep].contiguous(),
                    ids_restore=ids_restore, whole_regions=whole)
