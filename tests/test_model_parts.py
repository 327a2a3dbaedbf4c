"""Belief Predictor / patch codebook pieces and the spatial-consistency losses, against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models import ModelConfig
from pacofr.models.belief import BeliefPredictor, PatchCodebook
from pacofr.models.consistency import (
    ema_update,
    equivariance_loss,
    invert_affine,
    random_similarity,
    region_pool,
    relation_loss,
    relation_matrix,
    warp,
)


# ---------------------------------------------------------------------------------------------
# Belief Predictor and patch codebook
# ---------------------------------------------------------------------------------------------

def test_belief_predictor_outputs_unit_vectors(generator: torch.Generator) -> None:
    bp = BeliefPredictor(patch_dim=48, hidden=32, code_dim=8)
    q = bp(torch.randn(5, 7, 48, generator=generator))
    assert q.shape == (5, 7, 8) and q.dtype == torch.float32
    assert torch.allclose(q.norm(dim=-1), torch.ones(5, 7), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bp(torch.randn(3, 48, generator=generator)).dtype == torch.float32


def test_nearest_prototype_is_the_pixel_argmin(generator: torch.Generator) -> None:
    cfg = ModelConfig.preset("tiny")
    book = PatchCodebook(cfg)
    protos = book.prototypes(book.codes()).detach()
    # clustered patches: prototypes plus small noise, so the answer is unambiguous
    pick = torch.randint(cfg.codebook_size, (50,), generator=generator)
    patches = protos[pick] + 0.01 * torch.randn(50, cfg.patch_dim, generator=generator)
    labels = book.nearest_prototype(patches)
    brute = torch.cdist(patches.double(), protos.double()).argmin(dim=1)
    assert torch.equal(labels, brute)
    assert torch.equal(labels, pick)


def test_belief_losses_and_soft_token(generator: torch.Generator) -> None:
    cfg = ModelConfig.preset("tiny", num_candidates=3, tau_b=0.2, codebook_precision="ieee")  # exact math
    book = PatchCodebook(cfg)
    q = F.normalize(torch.randn(6, cfg.code_dim, generator=generator), dim=1)
    codes = book.codes()
    logits = q @ F.normalize(book.codebook.weight, dim=1).T / 0.2  # the dense belief logits
    labels = torch.randint(cfg.codebook_size, (6,), generator=generator)
    loss, accuracy = book.cross_entropy(q, codes, labels)
    assert torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-5)
    assert accuracy.item() == (logits.argmax(1) == labels).float().mean().item()
    assert torch.allclose(book.mean_belief(q, codes), logits.softmax(1).mean(0), atol=1e-6)
    target = F.normalize(torch.randn(6, cfg.code_dim, generator=generator), dim=1)
    want_kl = F.kl_div(logits.log_softmax(1), (target @ codes.T / 0.2).log_softmax(1), reduction="batchmean",
                       log_target=True)
    assert torch.allclose(book.belief_kl(q, target, codes), want_kl, atol=1e-5)
    token, indices, weights = book.soft_token(q, codes)
    top = logits.topk(3, dim=1)
    assert torch.equal(indices, top.indices)
    assert torch.allclose(weights, top.values.softmax(dim=1), atol=1e-5)
    assert torch.allclose(token, torch.einsum("nm,nmd->nd", weights, codes[indices]), atol=1e-5)


def test_usage_units_do_not_depend_on_the_batch() -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", codebook_decay=0.5))
    k = book.num_codes
    book.track_usage(torch.arange(k).unsqueeze(1), None)  # each code once
    once = book.codebook.ema_counts.clone()
    book.codebook.ema_counts.zero_()
    book.track_usage(torch.arange(k).repeat(5).unsqueeze(1), None)  # each code five times
    assert torch.allclose(once, book.codebook.ema_counts) and torch.allclose(once, torch.full((k,), 0.5))
    # soft weights: two candidates with weights 0.75 / 0.25 over codes (i, i + 1)
    book.codebook.ema_counts.zero_()
    idx = torch.stack([torch.arange(k), (torch.arange(k) + 1) % k], dim=1)
    w = torch.tensor([[0.75, 0.25]]).expand(k, 2)
    counts = book.track_usage(idx, w)
    assert torch.allclose(counts, torch.ones(k))


def test_restart_waits_for_the_warm_up(generator: torch.Generator) -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", dead_code_warmup=3, dead_code_threshold=0.5))
    candidates = F.normalize(torch.randn(10, book.codebook.dim, generator=generator), dim=1)
    for step in range(4):
        restarted = book.restart_dead(candidates)
        assert (restarted == 0) == (step < 3)
        book.track_usage(torch.zeros(4, 1, dtype=torch.long), None)  # only code 0 is used
    assert int(book.usage_steps) == 4


# ---------------------------------------------------------------------------------------------
# Spatial consistency
# ---------------------------------------------------------------------------------------------

def test_region_pool_matches_a_loop(generator: torch.Generator) -> None:
    features = torch.randn(3, 20, 5, generator=generator)
    region_ids = torch.randint(4, (3, 20), generator=generator)
    region_ids[:, :4] = torch.arange(4)
    region_ids[1][region_ids[1] == 2] = 0  # image 1 has no region 2
    pooled, counts = region_pool(features, region_ids, 5)
    for b in range(3):
        for g in range(5):
            members = region_ids[b] == g
            assert counts[b, g] == members.sum()
            want = features[b][members].mean(dim=0) if members.any() else torch.zeros(5)
            assert torch.allclose(pooled[b, g], want, atol=1e-6)


def test_relation_loss(generator: torch.Generator) -> None:
    features = torch.randn(2, 16, 8, generator=generator)
    region_ids = torch.arange(16).remainder(3).expand(2, -1).contiguous()
    masked = torch.tensor([[0, 5, 9], [1, 2, 3]])
    student = features.clone().requires_grad_(True)
    loss, parts = relation_loss(student, features, region_ids, 9, masked, beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # only present region pairs count: G = 9 with 3 present equals G = 3
    other = torch.randn(2, 16, 8, generator=generator)
    loss9, parts9 = relation_loss(other, features, region_ids, 9, masked, beta=0.0)
    loss3, _ = relation_loss(other, features, region_ids, 3, masked, beta=0.0)
    assert loss9.item() == pytest.approx(loss3.item(), rel=1e-6) and loss9 > 0
    pooled_s, _ = region_pool(other, region_ids, 3)
    pooled_t, _ = region_pool(features, region_ids, 3)
    manual = (relation_matrix(pooled_s) - relation_matrix(pooled_t)).square().mean()
    assert loss3.item() == pytest.approx(manual.item(), rel=1e-6)
    # the (1 - cos) term at the masked patches
    loss_b, parts_b = relation_loss(other, features, region_ids, 3, masked, beta=2.0)
    cos = F.cosine_similarity(torch.gather(other, 1, masked.unsqueeze(-1).expand(-1, -1, 8)),
                              torch.gather(features, 1, masked.unsqueeze(-1).expand(-1, -1, 8)), dim=-1)
    assert parts_b["sc_cos"].item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    assert loss_b.item() == pytest.approx(loss3.item() + 2.0 * parts_b["sc_cos"].item(), rel=1e-6)
    # gradient reaches the student only
    teacher = features.clone().requires_grad_(True)
    relation_loss(student * 2 + 1, teacher, region_ids, 3, masked, beta=1.0)[0].backward()
    assert student.grad is not None and teacher.grad is None


def test_affine_inverse_and_warp_by_whole_cells(generator: torch.Generator) -> None:
    theta = random_similarity(4, 15.0, 0.1, 0.1, generator, torch.device("cpu"))
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    square = torch.cat([theta, torch.tensor([[[0, 0, 1.0]]]).expand(4, 1, 3)], dim=1)
    inverse = torch.cat([invert_affine(theta), torch.tensor([[[0, 0, 1.0]]]).expand(4, 1, 3)], dim=1)
    assert torch.allclose((square @ inverse)[:, :2], identity.expand(4, 2, 3), atol=1e-5)
    scale = torch.linalg.det(theta[:, :, :2]).sqrt()
    assert ((scale > 0.89) & (scale < 1.11)).all()
    # a shift by exactly two cells of an 8 x 8 map moves the content by two cells
    x = torch.randn(1, 3, 8, 8, generator=generator)
    shift = torch.tensor([[[1.0, 0, 0.5], [0, 1.0, 0]]])  # 0.5 in normalised units = 2 cells
    moved = warp(x, shift)
    assert torch.allclose(moved[..., :6], x[..., 2:], atol=1e-6)
    assert (moved[..., 6:] == 0).all()


def test_equivariance_loss(generator: torch.Generator) -> None:
    student = torch.randn(2, 6, 8, 8, generator=generator)
    shift = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0]]).expand(2, 2, 3)
    teacher = warp(student, shift)  # what an exactly equivariant teacher sees of view 2
    loss, parts = equivariance_loss(student, teacher, shift, min_overlap=0.99)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["sc_overlap"].item() == pytest.approx(6 / 8)
    unrelated, _ = equivariance_loss(student, torch.randn(2, 6, 8, 8, generator=generator), shift, 0.99)
    assert unrelated.item() > 0.5


def test_ema_update() -> None:
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.25)
    for t, a, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.25 * a + 0.75 * s)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)

