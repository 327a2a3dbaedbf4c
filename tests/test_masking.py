"""Structured facial-region masking: set sizes, disjointness, regions, modes, reproducibility."""

from __future__ import annotations

import pytest
import torch

from pacofr.data.regions import OTHER, template_region_ids
from pacofr.masking import MaskSets, MaskSpec, sample_masks
from pacofr.models.config import ModelConfig

MODES = ("region", "random", "block")
REPLACE_FROM = ("visible", "masked", "all")


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


def test_region_mode_masks_whole_regions(generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode="region", r_mask=0.6, r_rep=0.15)
    region_ids = template_batch(64)
    masks = sample_masks(region_ids, cfg, generator)
    mask = masks.mask
    first, second = masks.masked_regions[:, 0], masks.masked_regions[:, 1]
    assert (first >= 0).all() and (first != OTHER).all(), "a face region is always masked whole"
    for b in range(64):
        for region in (first[b], second[b]):
            if region >= 0:
                inside = region_ids[b] == region
                assert mask[b][inside].all(), f"image {b}: region {int(region)} is not masked whole"
    assert not (second == first).any()
    assert not (second == OTHER).any()
    # the replaced patches are never inside a whole-masked region (they come from the visible ones)
    assert not (masks.replaced & (region_ids == first.unsqueeze(1))).any()


def test_replace_from_masked_takes_codes_out_of_the_structured_mask(generator: torch.Generator) -> None:
    cfg = ModelConfig(mask_mode="region", replace_from="masked", r_mask=0.6, r_rep=0.15, second_region_prob=0.0)
    region_ids = template_batch(32)
    masks = sample_masks(region_ids, cfg, generator)
    structured = masks.mask | masks.replaced
    for b in range(32):
        inside = region_ids[b] == masks.masked_regions[b, 0]
        assert structured[b][inside].all()


def test_second_region_probability(generator: torch.Generator) -> None:
    region_ids = template_batch(2000)
    for prob in (0.0, 1.0, 0.5):
        masks = sample_masks(region_ids, ModelConfig(second_region_prob=prob), generator)
        rate = (masks.masked_regions[:, 1] >= 0).float().mean().item()
        assert abs(rate - prob) < 0.05, (prob, rate)


def test_region_larger_than_the_budget_is_masked_partially(generator: torch.Generator) -> None:
    """A region with more patches than n_mask: all masked patches lie inside it."""
    length = 16
    region_ids = torch.zeros(8, length, dtype=torch.long)
    region_ids[:, 12:] = 1  # region 0: 12 patches, region 1: 4 patches
    spec = MaskSpec("region", length, n_mask=6, n_rep=2, other_region=1, num_regions=2)
    masks = sample_masks(region_ids, spec, generator)
    assert (masks.masked_regions[:, 0] == 0).all()
    assert (region_ids.gather(1, masks.ids_masked) == 0).all()
    check_partition(masks, length)


def test_fill_is_uniform_over_the_other_regions(generator: torch.Generator) -> None:
    """Outside the whole-masked regions every patch is masked with the same probability, so each
    region contributes in proportion to its size."""
    region_ids = template_batch(3000)
    masks = sample_masks(region_ids, ModelConfig(second_region_prob=0.0, r_rep=0.0), generator)
    chosen = region_ids == masks.masked_regions[:, :1]
    fill = masks.mask & ~chosen
    rates = []
    for region in range(9):
        candidates = (region_ids == region) & ~chosen
        rates.append((fill & candidates).sum().item() / candidates.sum().item())
    rates = torch.tensor(rates)
    assert (rates.max() - rates.min()).item() < 0.05, rates


def test_random_mode_is_uniform(generator: torch.Generator) -> None:
    masks = sample_masks(template_batch(3000), ModelConfig(mask_mode="random", r_rep=0.0), generator)
    frequency = masks.mask.float().mean(dim=0)
    assert (frequency - 0.6).abs().max().item() < 0.05


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
    cfg = ModelConfig(mask_mode="block", r_mask=0.3, r_rep=0.1)
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
    masks = sample_masks(region_ids, ModelConfig(second_region_prob=0.0), generator)
    for b in range(2):
        inside = region_ids[b] == masks.masked_regions[b, 0]
        assert masks.mask[b][inside].all()


def test_bad_inputs_are_rejected() -> None:
    cfg = ModelConfig()
    with pytest.raises(ValueError, match="region_ids must be in"):
        sample_masks(torch.full((2, 196), 9), cfg)
    with pytest.raises(ValueError, match="L=100"):
        sample_masks(torch.zeros(2, 100, dtype=torch.long), cfg)
    with pytest.raises(TypeError, match="region_ids"):
        sample_masks(torch.zeros(2, 196), cfg)
    with pytest.raises(ValueError, match="n_rep"):
        MaskSpec("region", 16, n_mask=2, n_rep=3, replace_from="masked")
    with pytest.raises(ValueError, match="mode"):
        MaskSpec("stripes", 16, n_mask=2, n_rep=1)
