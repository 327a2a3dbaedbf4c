"""Belief Predictor / patch codebook pieces and the spatial-consistency losses, against plain references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models import ModelConfig
from pacofr.models.patch_codebook import BeliefPredictor, MaintenanceInput, PatchCodebook
from pacofr.models.consistency import (
    LayoutHead,
    ema_update,
    equivariance_loss,
    invert_affine,
    layout_loss,
    random_similarity,
    region_centroids,
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


@pytest.mark.parametrize("prototypes", ["table", "linear"])
def test_nearest_prototype_is_the_pixel_argmin(prototypes: str, generator: torch.Generator) -> None:
    cfg = ModelConfig.preset("tiny", prototypes=prototypes)
    book = PatchCodebook(cfg)
    protos = book.prototype_table()
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


@pytest.mark.parametrize("m", [1, 2, 4])
def test_straight_through_token_passes_its_gradient_to_the_belief(m: int, generator: torch.Generator) -> None:
    """bp_ste: d(token . v)/dq = v + the softmax path; without it, M = 1 passes nothing to q."""
    for ste in (True, False):
        book = PatchCodebook(ModelConfig.preset("tiny", num_candidates=m, bp_ste=ste))
        q = F.normalize(torch.randn(5, 16, generator=generator), dim=1).requires_grad_(True)
        v = torch.randn(5, 16, generator=generator)
        codes = book.codes(detach=True)
        token = book.soft_token(q, codes).token
        (token * v).sum().backward()
        q_plain = q.detach().clone().requires_grad_(True)
        (_soft_only(book, q_plain, codes) * v).sum().backward()
        plain = q_plain.grad
        torch.testing.assert_close(q.grad, plain + v if ste else plain, atol=1e-5, rtol=1e-5)
        if m == 1:
            assert (q.grad.abs().sum() > 0) == ste


def _soft_only(book: PatchCodebook, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    from pacofr.ops.soft_assign import soft_assign

    return soft_assign(q, codes, book.num_candidates, book.tau, metric="cosine", backend="torch").token


def test_assignment_stats_by_hand() -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", num_candidates=3))
    codes = F.normalize(torch.eye(16)[:8].repeat(8, 1) + 0.001 * torch.arange(64.0)[:, None], dim=1)[:64]
    codes[1] = codes[0]  # codes 0 and 1 are duplicates
    from pacofr.ops.soft_assign import SoftAssignment

    weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    indices = torch.tensor([[0, 1, 2], [5, 6, 7]])
    stats = book.assignment_stats(SoftAssignment(torch.zeros(2, 16), indices, weights), torch.tensor([0, 4]), codes)
    want_entropy = (0.0 + -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))) / 2
    assert stats["cand_entropy"].item() == pytest.approx(want_entropy, rel=1e-6)
    assert stats["cand_top1_weight"].item() == pytest.approx(0.75)
    assert stats["cand_dup_fraction"].item() == pytest.approx(0.5)
    assert stats["bp_top1_agreement"].item() == pytest.approx(0.5)


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


EXACT = "donot_use_mm_for_euclid_dist"  # torch.cdist without the matmul expansion (exact small distances)


def _work(book: PatchCodebook, generator: torch.Generator, indices: torch.Tensor, seeds: int = 10) -> MaintenanceInput:
    """Maintenance input: usage of ``indices`` (N, 1), ``seeds`` random candidate patches, prototype stats."""
    x = torch.randn(seeds, book.pixel_book.dim, generator=generator)
    q = F.normalize(torch.randn(seeds, book.codebook.dim, generator=generator), dim=1)
    counts, sums = book.prototype_stats(x[:indices.shape[0]], indices[:, 0])
    return MaintenanceInput(usage_indices=indices, usage_weights=None, q_labelled=None, labels=None,
                            proto_counts=counts, proto_sums=sums, candidates_q=q, candidates_x=x)


def test_first_step_seeds_every_code_from_the_data_then_restarts_wait_for_the_warm_up(generator) -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", dead_code_warmup=3, dead_code_threshold=0.5))
    k = book.num_codes
    work = _work(book, generator, torch.zeros(4, 1, dtype=torch.long), seeds=2 * k)
    assert book.maintain(work)["restarted_codes"] == k, "the first step seeds all K codes"
    for rows, book_rows in ((work.candidates_q, book.codebook.weight), (work.candidates_x, book.pixel_book.weight)):
        want = F.normalize(rows, dim=1) if rows is work.candidates_q else rows
        distance = torch.cdist(book_rows.detach(), want, compute_mode=EXACT).min(dim=1).values
        assert distance.max() < 1e-5, "every code and prototype is one of the candidates"
    # a code and its prototype come from the same patch
    code_of = torch.cdist(book.codebook.weight.detach(), F.normalize(work.candidates_q, dim=1), compute_mode=EXACT)
    prototype_of = torch.cdist(book.pixel_book.weight.detach(), work.candidates_x, compute_mode=EXACT)
    assert torch.equal(code_of.argmin(dim=1), prototype_of.argmin(dim=1))
    # only code 0 is used: the others may die once they have a usage record of dead_code_warmup = 3 steps
    for step in range(2, 7):
        restarted = book.maintain(_work(book, generator, torch.zeros(4, 1, dtype=torch.long)))["restarted_codes"]
        assert (restarted == 0) == (step < 4), step
    assert int(book.usage_steps) == 6 and int(book.code_age[0]) == 5


def test_usage_report_is_measured_before_restarts(generator: torch.Generator) -> None:
    """Codes used at ~6.6 % of uniform usage are reported as rarely used at every step (bias-corrected
    EMA from the first step), and a restarted code counts as rarely used until it earns usage (the
    earlier dead_fraction was 0 after the warm-up by construction)."""
    cfg = ModelConfig.preset("tiny", dead_code_warmup=5, dead_code_threshold=0.03, prototypes="linear")
    book = PatchCodebook(cfg)
    k = book.num_codes
    rare = torch.arange(k) < k // 4
    usage = torch.where(rare, 0.05, 1.0)
    usage = usage * (k / usage.sum())  # a uniform code would get 1: rare ones get 0.066, the others 1.31
    reports = []
    for _ in range(60):
        q = F.normalize(torch.randn(2 * k, cfg.code_dim, generator=generator), dim=1)
        work = MaintenanceInput(usage_indices=torch.arange(k).unsqueeze(1), usage_weights=usage.unsqueeze(1),
                                q_labelled=None, labels=None, proto_counts=None, proto_sums=None,
                                candidates_q=q, candidates_x=torch.zeros(2 * k, cfg.patch_dim))
        reports.append(book.maintain(work))
    low = [r["low_usage_fraction"] for r in reports]
    assert all(value == pytest.approx(0.25) for value in low), low
    assert all(r["dead_fraction"] == 0.0 for r in reports[1:]), "6.6 % of uniform is above the 3 % restart threshold"
    # a code that stops being used dies, is restarted, and stays "rarely used" until it earns usage
    usage[-1] = 0.0
    for _ in range(400):
        work.usage_weights = usage.unsqueeze(1)
        report = book.maintain(work)
        if report["restarted_codes"]:
            break
    assert report["restarted_codes"] == 1 and report["low_usage_fraction"] == pytest.approx(0.25 + 1 / k)
    assert book.usage_report()["low_usage_fraction"] == pytest.approx(0.25 + 1 / k)


def test_prototype_table_is_an_ema_of_the_nearest_patches(generator: torch.Generator) -> None:
    """Online k-means: a freshly seeded prototype becomes the mean of the first patches nearest to
    it, then the decay-weighted mean of the patches of every step (bias-corrected EMA); a prototype
    that no patch chose keeps its vector."""
    book = PatchCodebook(ModelConfig.preset("tiny", codebook_decay=0.5))
    k, dim = book.num_codes, book.pixel_book.dim
    seeds = torch.randn(k, dim, generator=generator) * 3
    book.pixel_book.reseed(torch.arange(k), seeds, 0.0)
    batches = [seeds[torch.randint(8, (30,), generator=generator)] + torch.randn(30, dim, generator=generator)
               for _ in range(2)]
    stats = []
    for x in batches:
        labels = book.nearest_prototype(x)
        counts, sums = book.prototype_stats(x, labels)
        assert torch.equal(counts, torch.bincount(labels, minlength=k).float())
        stats.append((counts, sums))
        book.update_prototypes(counts.clone(), sums.clone())
        if len(stats) == 1:
            used = counts > 0
            torch.testing.assert_close(book.pixel_book.weight[used], sums[used] / counts[used, None])
            torch.testing.assert_close(book.pixel_book.weight[~used], seeds[~used])
    (c1, s1), (c2, s2) = stats
    used = (c1 + c2) > 0
    want = (0.5 * s1 + s2) / (0.5 * c1 + c2).clamp_min(1e-30)[:, None]
    torch.testing.assert_close(book.pixel_book.weight[used], want[used], rtol=1e-5, atol=1e-5)
    assert not book.pixel_book.weight.requires_grad


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



# ---------------------------------------------------------------------------------------------
# Region layout
# ---------------------------------------------------------------------------------------------

def _faces_region_ids(count: int, generator: torch.Generator, grid: int = 14) -> torch.Tensor:
    """Landmark region maps of jittered template faces (poses and scales differ from face to face)."""
    from pacofr.data.alignment import template_for_size
    from pacofr.data.regions import landmark_region_ids

    base = torch.from_numpy(template_for_size(224)).double()
    angle = (torch.rand(count, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    scale = 1 + (torch.rand(count, generator=generator, dtype=torch.float64) - 0.5) * 0.3
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    moved = (base - 111.5) @ (rot * scale[:, None, None]).transpose(1, 2) + 111.5
    return landmark_region_ids(moved, grid, 224)


def test_region_centroids_match_a_loop(generator: torch.Generator) -> None:
    region_ids = _faces_region_ids(3, generator, grid=7)
    centroids, present = region_centroids(region_ids, 7, 14)
    for b in range(3):
        for g in range(14):
            cells = torch.nonzero(region_ids[b] == g).flatten()
            assert present[b, g] == (cells.numel() > 0)
            if cells.numel():
                want = torch.stack([(cells % 7).float() + 0.5, (cells // 7).float() + 0.5], -1).mean(0) / 7
                assert torch.allclose(centroids[b, g], want, atol=1e-6)


def test_layout_loss_scores_the_relative_layout(generator: torch.Generator) -> None:
    region_ids = _faces_region_ids(16, generator)
    head = LayoutHead(8, 14, 8)
    pairs = head.pairs
    centroids, present = region_centroids(region_ids, 14, 14)
    truth = centroids[:, pairs[1]] - centroids[:, pairs[0]]
    # exact offsets score 0, also shifted by a constant per pair (only the differences between faces count)
    assert layout_loss(truth, region_ids, pairs, 14, 14)[0].item() == pytest.approx(0.0, abs=1e-9)
    shifted = truth + torch.randn(1, pairs.shape[1], 2, generator=generator)
    assert layout_loss(shifted, region_ids, pairs, 14, 14)[0].item() == pytest.approx(0.0, abs=1e-9)
    # one layout for every face scores the variance share: var / (var + floor), below 1
    same = truth.mean(dim=0, keepdim=True).expand_as(truth).clone().requires_grad_(True)
    loss, parts = layout_loss(same, region_ids, pairs, 14, 14)
    variance = (truth - truth.mean(0)).square().mean(0)
    assert loss.item() == pytest.approx((variance / (variance + (0.25 / 14) ** 2)).mean().item(), rel=1e-5)
    assert 0.3 < loss.item() < 1.0 and parts["sc_layout"] == loss.detach()
    # the layout of other faces scores worse than one layout for all
    assert layout_loss(truth.roll(1, dims=0), region_ids, pairs, 14, 14)[0] > loss
    loss.backward()
    assert same.grad.abs().sum() > 0
    # pairs with an absent region do not count
    region_ids[region_ids == 13] = 12  # drop the neck region
    centroids, present = region_centroids(region_ids, 14, 14)
    assert not present[:, 13].any()
    exact = centroids[:, pairs[1]] - centroids[:, pairs[0]]
    exact[:, (pairs[1] == 13) | (pairs[0] == 13)] = 99.0
    assert layout_loss(exact, region_ids, pairs, 14, 14)[0].item() == pytest.approx(0.0, abs=1e-9)


def test_layout_head_shapes() -> None:
    head = LayoutHead(32, 14, 16)
    assert head.pairs.shape == (2, 91) and (head.pairs[0] < head.pairs[1]).all()
    assert head(torch.randn(5, 32)).shape == (5, 91, 2)
