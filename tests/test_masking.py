"""Structured facial-region masking: set sizes, disjointness, whole regions, budget, modes, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from pacofr.data.alignment import template_for_size
from pacofr.data.regions import NUM_FACE_REGIONS, NUM_REGIONS, landmark_region_ids, template_region_ids
from pacofr.models.masking import MaskSets, MaskSpec, sample_masks
from pacofr.models.config import ModelConfig

MODES = ("region", "random", "block")
REPLACE_FROM = ("visible", "masked", "all")

SIGMAS = 5.0
"""How many standard errors a sampled rate may stray from its expectation: a two-sided 5-sigma check
fails by chance with probability 5.7e-7 (about 1e-4 for the 196 patches of the uniformity check)."""


def rate_sigma(p: float, draws: int) -> float:
    """Standard error of a rate with expectation ``p`` measured over ``draws`` independent images:
    sqrt(p (1 - p) / draws) (binomial; an average over several patches of one image varies no more)."""
    return math.sqrt(p * (1 - p) / draws)


def template_batch(batch: int, grid: int = 14, image_size: int = 224) -> torch.Tensor:
    return template_region_ids(grid, image_size).expand(batch, -1).contiguous()


def check_partition(masks: MaskSets, length: int) -> None:
    """Visible, replaced and masked are disjoint, cover every patch, and ids_restore unshuffles."""
    batch = masks.ids_restore.shape[0]
    everything = torch.cat([masks.ids_visible, masks.ids_replaced, masks.ids_masked], dim=1)
    assert everything.shape == (batch, length)
    assert torch.equal(everything.sort(dim=1).values, torch.arange(length).expand(batch, length))
    assert torch.equal(masks.ids_keep, torch.cat([masks.ids_visible, masks.ids_replaced], dim=1))
    shuffle = torch.cat([masks.ids_keep, masks.ids_masked], dim=1)
    assert torch.equal(torch.gather(shuffle, 1, masks.ids_restore), torch.arange(length).expand(batch, length))
    for ids in (masks.ids_visible, masks.ids_replaced, masks.ids_masked):
        assert ids.dtype == torch.int64
        assert torch.equal(ids, ids.sort(dim=1).values)
    labels = masks.membership()
    assert torch.equal(masks.mask, labels == 2) and torch.equal(masks.replaced, labels == 1)
    assert (masks.mask.sum(1) == masks.ids_masked.shape[1]).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replace_from", REPLACE_FROM)
def test_counts_disjoint_and_restore(mode: str, replace_from: str, generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode=mode, replace_from=replace_from, r_mask=0.6, r_rep=0.15)
    length = cfg.num_patches
    masks = sample_masks(template_batch(16), cfg, generator)
    n_mask, n_rep = round(0.6 * length), round(0.15 * length)
    expected_masked = n_mask - n_rep if replace_from == "masked" else n_mask
    assert masks.ids_masked.shape == (16, expected_masked)
    assert masks.ids_replaced.shape == (16, n_rep)
    assert masks.ids_visible.shape == (16, length - expected_masked - n_rep)
    check_partition(masks, length)


def _check_whole_regions(region_ids: torch.Tensor, masks: MaskSets, structured: torch.Tensor) -> None:
    """whole_regions names exactly the present regions inside ``structured``, and every region the
    structured mask touches is whole except at most one (the one that crosses the budget)."""
    for b in range(region_ids.shape[0]):
        touched = set(region_ids[b][structured[b]].tolist())
        whole = {g for g in touched if structured[b][region_ids[b] == g].all()}
        assert set(torch.nonzero(masks.whole_regions[b]).flatten().tolist()) == whole
        assert len(touched - whole) <= 1, f"image {b}: regions {sorted(touched - whole)} are masked partially"


def test_region_mode_masks_whole_regions_up_to_the_budget(generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode="region", replace_from="visible")
    region_ids = template_batch(64)
    masks = sample_masks(region_ids, cfg, generator)
    _check_whole_regions(region_ids, masks, masks.mask)
    in_whole = torch.gather(masks.whole_regions, 1, region_ids) & masks.mask
    largest = int(torch.bincount(region_ids[0]).max())
    # all masked patches but those of one region lie in whole regions
    assert (in_whole.sum(dim=1) >= masks.ids_masked.shape[1] - largest).all()
    # the line above guarantees (147 - 28) / 147 = 0.81; measured over 300 batches of 64: at least 0.916,
    # mean 0.934, sd 0.0058, so 0.85 is 14 sd below the mean and still above the guarantee
    assert in_whole.sum().item() / masks.mask.sum().item() > 0.85
    # the replaced patches come from the visible ones, never from inside a whole-masked region
    assert not (masks.replaced & torch.gather(masks.whole_regions, 1, region_ids)).any()


def test_region_masking_budget_matches_mae_face(generator: torch.Generator) -> None:
    """Region masking masks 75 % of the patches (the default r_mask), as the MAE-face control does,
    and face patches nearly as often (measured over 400,000 draws: 73.7 % on the template, 73.4 % on
    the turned face; small regions 73 %, the large periphery ones 76 %; the earlier scheme: 65.8 %).
    Replaced patches come from the visible ones here, so the whole structured mask stays masked.

    The bounds are that systematic offset plus SIGMAS standard errors of a 4,000-image rate: the face
    mean is 0.016 off (measured sd 0.0031 over 100 batches), the farthest region 0.024 (region 1 of the
    turned face; sd at most rate_sigma(0.75, 4000) = 0.0068)."""
    cfg = ModelConfig(mask_mode="region", replace_from="visible")
    assert cfg.r_mask == cfg.mae_mask_ratio == 0.75
    template = torch.from_numpy(template_for_size(224)).double()
    turned = template.clone()
    turned[:, 0] = 112 + (turned[:, 0] - 112) * torch.tensor([1.0, 0.8, 0.7, 1.0, 0.8], dtype=torch.float64)
    for region_map in (template_region_ids(14, 224), landmark_region_ids(turned, 14, 224)):
        region_ids = region_map.expand(4000, -1).contiguous()
        masks = sample_masks(region_ids, cfg, generator)
        assert masks.ids_masked.shape[1] == round(0.75 * 196)
        frequency = masks.mask.float().mean(dim=0)
        face = region_map < NUM_FACE_REGIONS
        assert abs(frequency[face].mean().item() - 0.75) < 0.016 + SIGMAS * 0.0031, frequency[face].mean()
        for region in region_map.unique():
            rate = frequency[region_map == region].mean().item()
            assert abs(rate - 0.75) < 0.024 + SIGMAS * rate_sigma(0.75, 4000), (int(region), rate)


def test_replace_from_masked_takes_codes_out_of_the_structured_mask(generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode="region", replace_from="masked", r_mask=0.6, r_rep=0.15)
    region_ids = template_batch(32)
    masks = sample_masks(region_ids, cfg, generator)
    _check_whole_regions(region_ids, masks, masks.mask | masks.replaced)
    assert masks.whole_regions.any(dim=1).all()


def test_region_larger_than_the_budget_is_masked_partially(generator: torch.Generator) -> None:
    """A region with more patches than n_mask: when it comes first, all masked patches lie inside it."""
    length = 16
    region_ids = torch.zeros(64, length, dtype=torch.long)
    region_ids[:, 12:] = 1  # region 0: 12 patches, region 1: 4 patches
    spec = MaskSpec("region", length, n_mask=6, n_rep=2, num_regions=2)
    masks = sample_masks(region_ids, spec, generator)
    inside = (region_ids.gather(1, masks.ids_masked) == 0).all(dim=1)
    whole_small = masks.whole_regions[:, 1]
    assert (inside | whole_small).all(), "either region 0 first (partial) or region 1 whole, then part of region 0"
    assert inside.any() and whole_small.any()
    assert not masks.whole_regions[:, 0].any()
    check_partition(masks, length)


def test_other_region_only_completes_the_budget(generator: torch.Generator) -> None:
    length = 16
    region_ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 8).expand(200, -1).contiguous()
    spec = MaskSpec("region", length, n_mask=10, n_rep=0, num_regions=3, other_region=2)
    masks = sample_masks(region_ids, spec, generator)
    assert masks.whole_regions[:, :2].all(), "regions 0 and 1 (8 patches) are masked before region 2"
    assert (masks.mask & (region_ids == 2)).sum(dim=1).eq(2).all()


def test_region_order_is_uniform(generator: torch.Generator) -> None:
    """Equal-sized regions are masked whole equally often."""
    region_ids = torch.arange(16).div(4, rounding_mode="floor").expand(4000, -1).contiguous()  # 4 regions of 4
    spec = MaskSpec("region", 16, n_mask=6, n_rep=0, num_regions=4)
    masks = sample_masks(region_ids, spec, generator)
    rates = masks.whole_regions.float().mean(dim=0)  # one region is whole per image: each at 1/4
    # measured sd 0.0064-0.0074 over 50 batches, as rate_sigma(0.25, 4000) = 0.0068 says
    assert torch.allclose(rates, torch.full((4,), 0.25), rtol=0, atol=SIGMAS * rate_sigma(0.25, 4000)), rates


def test_random_mode_is_uniform(generator: torch.Generator) -> None:
    masks = sample_masks(template_batch(3000), ModelConfig(mask_mode="random", r_rep=0.0), generator)
    frequency = masks.mask.float().mean(dim=0)  # each patch masked with probability 147 / 196 = 0.75
    assert (frequency - 0.75).abs().max().item() < SIGMAS * rate_sigma(0.75, 3000)
    assert not masks.whole_regions.any()


def _components(cells: torch.Tensor) -> int:
    """Number of 4-connected components of True cells in a (g, g) bool grid."""
    seen = torch.zeros_like(cells)
    count = 0
    g = cells.shape[0]
    for start in zip(*torch.nonzero(cells, as_tuple=True)):
        if seen[start]:
            continue
        count += 1
        stack = [tuple(int(v) for v in start)]
        while stack:
            r, c = stack.pop()
            if not (0 <= r < g and 0 <= c < g) or seen[r, c] or not cells[r, c]:
                continue
            seen[r, c] = True
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


def test_block_mode_is_one_contiguous_block(generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode="block", replace_from="visible", r_mask=0.3, r_rep=0.1)
    masks = sample_masks(template_batch(20), cfg, generator)
    for b in range(20):
        assert _components(masks.mask[b].view(14, 14)) == 1


def test_mae_control_spec(generator: torch.Generator) -> None:
    cfg = ModelConfig(method="mae", mask_mode="region", r_mask=0.6, r_rep=0.15)
    spec = MaskSpec.from_config(cfg)
    assert (spec.mode, spec.n_mask, spec.n_rep) == ("random", round(0.75 * 196), 0)
    masks = sample_masks(template_batch(4), cfg, generator)
    assert masks.ids_masked.shape == (4, 147) and masks.ids_replaced.shape == (4, 0)
    check_partition(masks, 196)


def test_no_codebook_replaces_nothing() -> None:
    spec = MaskSpec.from_config(ModelConfig(mask_mode="region", codebook=False))
    assert (spec.mode, spec.n_mask, spec.n_rep) == ("region", 147, 0)


def test_same_seed_same_masks() -> None:
    region_ids = template_batch(8)
    cfg = ModelConfig()
    a = sample_masks(region_ids, cfg, torch.Generator().manual_seed(3))
    b = sample_masks(region_ids, cfg, torch.Generator().manual_seed(3))
    c = sample_masks(region_ids, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_restore, b.ids_restore)
    assert not torch.equal(a.ids_restore, c.ids_restore)


def test_landmark_style_per_image_regions(generator: torch.Generator) -> None:
    """Different region maps per image (as the landmark assignment gives) are honoured per image."""
    region_ids = torch.stack([template_region_ids(14, 224), template_region_ids(14, 224).roll(3)])
    masks = sample_masks(region_ids, ModelConfig(mask_mode="region", replace_from="visible"), generator)
    _check_whole_regions(region_ids, masks, masks.mask)


def test_bad_inputs_are_rejected() -> None:
    cfg = ModelConfig(mask_mode="region")  # the mode that reads the region ids' values
    with pytest.raises(ValueError, match="region_ids must be in"):
        sample_masks(torch.full((2, 196), NUM_REGIONS), cfg)
    with pytest.raises(ValueError, match="L=100"):
        sample_masks(torch.zeros(2, 100, dtype=torch.long), cfg)
    with pytest.raises(TypeError, match="region_ids"):
        sample_masks(torch.zeros(2, 196), cfg)
    with pytest.raises(ValueError, match="n_rep"):
        MaskSpec("region", 16, n_mask=2, n_rep=3, replace_from="masked")
    with pytest.raises(ValueError, match="mode"):
        MaskSpec("stripes", 16, n_mask=2, n_rep=1)
