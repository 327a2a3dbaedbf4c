"""Belief Predictor / patch codebook pieces and the spatial-consistency losses, against plain references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32, cosine_error, gamma, lerp_error, unit_norm_error, whole_cell_warp_error
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
    warp,
)


# ---------------------------------------------------------------------------------------------
# Belief Predictor and patch codebook
# ---------------------------------------------------------------------------------------------

def belief_logit_error(dc: int, tau: float) -> float:
    """Bound on the fp32 error of a belief logit q . e_k / tau against float64, for a unit fp32 q and a code
    that the library normalises in fp32: the normalisation moves each code element by (dc / 2 + 2) u relative
    (as in :func:`unit_norm_error`), the dot of dc products by dc u (sum |q_i e_i| <= |q| |e| = 1), the
    scaling by one rounding of |logit| <= 1 / tau: (1.5 dc + 3) u / tau."""
    return (1.5 * dc + 3) * U32 / tau


def log_softmax_error(dc: int, k: int, tau: float) -> float:
    """Bound on the fp32 error of one log-probability log softmax(s)_k over k belief logits: its own logit's
    error and the log-sum-exp's (2 :func:`belief_logit_error`), plus the stable log-sum-exp's roundings: the
    shift s - max s (|s - max s| <= 2 / tau, one rounding), k exponentials and their sum ((k + 1) u
    relative, the same absolute after the log), the log and the add-back (2 u |lse|, |lse| <= 1 / tau + log k)."""
    return 2 * belief_logit_error(dc, tau) + (2 / tau + k + 1 + 2 * (1 / tau + math.log(k))) * U32


def test_belief_predictor_outputs_unit_vectors(generator: torch.Generator) -> None:
    bp = BeliefPredictor(patch_dim=48, hidden=32, code_dim=8)
    q = bp(torch.randn(5, 7, 48, generator=generator))
    assert q.shape == (5, 7, 8) and q.dtype == torch.float32
    # an fp32 normalisation, its norm recomputed in fp32 (measured worst 3 u over 200 seeds)
    assert torch.allclose(q.norm(dim=-1), torch.ones(5, 7), rtol=0, atol=unit_norm_error(8))
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
    """The belief losses and the soft token against the dense float64 formulas, within the fp32 error
    models above (measured worst over 200 seeds, in u: CE 12, mean belief 12 relative, KL 14, weights 3.2,
    token given its weights 1.1; each bound is 20-60x above it, the worst case of every rounding)."""
    cfg = ModelConfig.preset("tiny", num_candidates=3, tau_b=0.2, codebook_precision="ieee")  # exact math
    book = PatchCodebook(cfg)
    n, k, dc, m, tau = 6, cfg.codebook_size, cfg.code_dim, 3, 0.2
    q = F.normalize(torch.randn(n, dc, generator=generator), dim=1)
    codes = book.codes()
    codes64 = F.normalize(book.codebook.weight.detach().double(), dim=1)
    logits = q.double() @ codes64.T / tau  # the dense belief logits, float64
    labels = torch.randint(k, (n,), generator=generator)
    loss, accuracy = book.cross_entropy(q, codes, labels)
    want = F.cross_entropy(logits, labels)
    # a mean of n log-probabilities: each off by log_softmax_error, the mean gamma(n) relative
    assert abs(loss.item() - want.item()) <= log_softmax_error(dc, k, tau) + gamma(n) * want.item()
    assert accuracy.item() == (logits.argmax(1) == labels).float().mean().item()
    # a probability exp(log p) is off by log_softmax_error + u relative, the mean over n rows gamma(n) more
    want_belief = logits.softmax(1).mean(0)
    belief_bound = (log_softmax_error(dc, k, tau) + U32 + gamma(n)) * want_belief
    assert ((book.mean_belief(q, codes).double() - want_belief).abs() <= belief_bound).all()
    target = F.normalize(torch.randn(n, dc, generator=generator), dim=1)
    target_log = (target.double() @ codes64.T / tau).log_softmax(1)
    want_kl = F.kl_div(logits.log_softmax(1), target_log, reduction="batchmean", log_target=True)
    # KL = sum_k p_t (log p_t - log p_q): both log-probabilities off by log_softmax_error (2 of them, p_t sums
    # to 1); p_t itself by that relative and the sum over k by gamma(k), both times sum_k |p_t log ratio|
    terms = (target_log.exp() * (target_log - logits.log_softmax(1))).abs().sum(1).mean().item()
    kl_bound = 2 * log_softmax_error(dc, k, tau) + (log_softmax_error(dc, k, tau) + gamma(k + 1)) * terms
    assert abs(book.belief_kl(q, target, codes).item() - want_kl.item()) <= kl_bound + gamma(n) * want_kl.item()
    token, indices, weights = book.soft_token(q, codes)
    top = logits.topk(m, dim=1)
    assert torch.equal(indices, top.indices)
    # soft_assign renormalises q and the codes (2 x (dc / 2 + 2) u on top of the codes' own normalisation):
    # a chosen logit is off by (2.5 dc + 6) u / tau; a weight w by w (2 of those + (m + 2) u), w <= 1
    weight_bound = 2 * (2.5 * dc + 6) * U32 / tau + (m + 2) * U32
    assert ((weights.double() - top.values.softmax(dim=1)).abs() <= weight_bound).all()
    # given its weights, the token sums m unit codes normalised twice in fp32 (|token_i| <= 1): (dc + 4 + m) u
    token_given_weights = torch.einsum("nm,nmd->nd", weights.double(), codes64[indices])
    assert ((token.double() - token_given_weights).abs() <= (dc + 4 + m) * U32).all()


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
        if ste:  # the straight-through path adds v to the soft path's gradient: one fp32 addition
            assert ((q.grad - (plain + v)).abs() <= U32 * (plain.abs() + v.abs())).all()
        else:  # the same computation as the reference: bit for bit (measured on 900 cases, 0 ulp apart)
            assert torch.equal(q.grad, plain)
        if m == 1:
            assert (q.grad.abs().sum() > 0) == ste


def _soft_only(book: PatchCodebook, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    from pacofr.ops.soft_assign import soft_assign

    # the book's precision: with another one the candidates differ at near-ties (tf32 against ieee put the
    # gradients up to 2 apart on 5 of 300 seeds at M = 4, failing the test)
    return soft_assign(q, codes, book.num_candidates, book.tau, metric="cosine", precision=book.precision,
                       backend="torch").token


def test_assignment_stats_by_hand() -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", num_candidates=3))
    codes = F.normalize(torch.eye(16)[:8].repeat(8, 1) + 0.001 * torch.arange(64.0)[:, None], dim=1)[:64]
    codes[1] = codes[0]  # codes 0 and 1 are duplicates
    from pacofr.ops.soft_assign import SoftAssignment

    weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    indices = torch.tensor([[0, 1, 2], [5, 6, 7]])
    stats = book.assignment_stats(SoftAssignment(torch.zeros(2, 16), indices, weights), torch.tensor([0, 4]), codes)
    want_entropy = (0.0 + -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))) / 2
    # fp32 entropy of powers of two: each log and product rounds (2 u), 3 non-negative terms summed and the
    # mean of 2 rows (3 u more, all relative): gamma(6) of the value
    assert stats["cand_entropy"].item() == pytest.approx(want_entropy, rel=gamma(6), abs=0)
    # means of 2 dyadic values: exact in fp32
    assert stats["cand_top1_weight"].item() == 0.75
    assert stats["cand_dup_fraction"].item() == 0.5 and stats["bp_top1_agreement"].item() == 0.5


def test_usage_units_do_not_depend_on_the_batch() -> None:
    book = PatchCodebook(ModelConfig.preset("tiny", codebook_decay=0.5))
    k = book.num_codes
    book.track_usage(torch.arange(k).unsqueeze(1), None)  # each code once
    once = book.codebook.ema_counts.clone()
    assert torch.equal(once, torch.full((k,), 0.5)), "weight K / K = 1 and half of it: exact"
    book.codebook.ema_counts.zero_()
    book.track_usage(torch.arange(k).repeat(5).unsqueeze(1), None)  # each code five times
    # five fp32 weights K / 5K (each rounded once) summed: gamma(5) relative
    torch.testing.assert_close(book.codebook.ema_counts, once, rtol=gamma(5), atol=0)
    # soft weights: two candidates with weights 0.75 / 0.25 over codes (i, i + 1)
    book.codebook.ema_counts.zero_()
    idx = torch.stack([torch.arange(k), (torch.arange(k) + 1) % k], dim=1)
    w = torch.tensor([[0.75, 0.25]]).expand(k, 2)
    counts = book.track_usage(idx, w)
    assert torch.equal(counts, torch.ones(k)), "0.75 + 0.25 at weight 1: exact"



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
        assert distance.max() == 0, "every code and prototype is a copy of one of the candidates (same F.normalize)"
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
    assert all(value == 0.25 for value in low), low  # a mean of 64 booleans: exact in fp32
    assert all(r["dead_fraction"] == 0.0 for r in reports[1:]), "6.6 % of uniform is above the 3 % restart threshold"
    # a code that stops being used dies, is restarted, and stays "rarely used" until it earns usage
    usage[-1] = 0.0
    for _ in range(400):
        work.usage_weights = usage.unsqueeze(1)
        report = book.maintain(work)
        if report["restarted_codes"]:
            break
    assert report["restarted_codes"] == 1 and report["low_usage_fraction"] == 0.25 + 1 / k  # 17 / 64: exact
    assert book.usage_report()["low_usage_fraction"] == 0.25 + 1 / k


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
            # (0.5 fl(s x scale)) / (0.5 fl(c x scale)): three roundings of the mean s / c (measured worst 2 u)
            want = sums.double()[used] / counts.double()[used, None]
            torch.testing.assert_close(book.pixel_book.weight[used].double(), want, rtol=gamma(3), atol=0)
            assert torch.equal(book.pixel_book.weight[~used], seeds[~used])
    (c1, s1), (c2, s2) = [(c.double(), s.double()) for c, s in stats]
    used = (c1 + c2) > 0
    denominator = (0.5 * c1 + c2).clamp_min(1e-30)[:, None]
    want = (0.5 * s1 + s2) / denominator  # the two batches have 30 patches each: their usage scales cancel
    # the EMA sums: scaling (u), lerp's difference and its update (2 u, of |s1| + |s2| at most), so 4 u of
    # (0.5 |s1| + |s2|) times the scale; the counts likewise 4 u relative; the quotient u:
    # 9 u (0.5 |s1| + |s2|) / (0.5 c1 + c2) per element (measured worst 4.4 u of it over 150 seeds)
    bound = gamma(9) * (0.5 * s1.abs() + s2.abs()) / denominator
    assert ((book.pixel_book.weight.double() - want).abs() <= bound)[used].all()
    assert not book.pixel_book.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# Spatial consistency
# ---------------------------------------------------------------------------------------------

RELATION_RTOL = 32 * U32
"""Relative bound between fp32 relation losses computed in another layout or against float64: the losses
are means of squared differences of cosines that may nearly cancel, so no useful worst case; measured over
1,000 seeds of the test's shapes: 8.0 u (G = 9 against G = 3) and 9.6 u (against float64), 3.3x below."""


def _relation_matrix64(features: torch.Tensor, region_ids: torch.Tensor, num_regions: int) -> torch.Tensor:
    """(B, G, G) float64 cosines of the per-region mean features, by a loop (every region present)."""
    pooled = torch.stack([torch.stack([features[b][region_ids[b] == g].double().mean(dim=0)
                                       for g in range(num_regions)]) for b in range(features.shape[0])])
    unit = F.normalize(pooled, dim=-1)
    return unit @ unit.transpose(1, 2)


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
            if not members.any():
                assert torch.equal(pooled[b, g], torch.zeros(5))
                continue
            # a mean of the members in fp32 (the one-hot products are exact): gamma(count) of sum |f| / count,
            # and the division one rounding more
            rows = features[b][members].double()
            bound = gamma(int(members.sum()) + 1) * rows.abs().mean(dim=0)
            assert ((pooled[b, g].double() - rows.mean(dim=0)).abs() <= bound).all()


def test_relation_loss(generator: torch.Generator) -> None:
    features = torch.randn(2, 16, 8, generator=generator)
    region_ids = torch.arange(16).remainder(3).expand(2, -1).contiguous()
    masked = torch.tensor([[0, 5, 9], [1, 2, 3]])
    student = features.clone().requires_grad_(True)
    loss, parts = relation_loss(student, features, region_ids, 9, masked, beta=1.0)
    # the same fp32 inputs give the same relation matrices; 1 - cos(x, x) is one cosine's rounding
    assert parts["sc_relation"].item() == 0.0 and abs(loss.item()) <= cosine_error(8)
    # only present region pairs count: G = 9 with 3 present equals G = 3
    other = torch.randn(2, 16, 8, generator=generator)
    loss9, parts9 = relation_loss(other, features, region_ids, 9, masked, beta=0.0)
    loss3, _ = relation_loss(other, features, region_ids, 3, masked, beta=0.0)
    assert loss9.item() == pytest.approx(loss3.item(), rel=RELATION_RTOL, abs=0) and loss9 > 0
    # the loss from a float64 loop over the regions (not the library's pooling)
    manual = (_relation_matrix64(other, region_ids, 3) - _relation_matrix64(features, region_ids, 3)).square().mean()
    assert loss3.item() == pytest.approx(manual.item(), rel=RELATION_RTOL, abs=0)
    # the (1 - cos) term at the masked patches
    loss_b, parts_b = relation_loss(other, features, region_ids, 3, masked, beta=2.0)
    cos = F.cosine_similarity(torch.gather(other, 1, masked.unsqueeze(-1).expand(-1, -1, 8)).double(),
                              torch.gather(features, 1, masked.unsqueeze(-1).expand(-1, -1, 8)).double(), dim=-1)
    # a mean of 6 terms 1 - cos, each off by one cosine's rounding (measured worst 2.2 u)
    want_cos = (1 - cos).mean().item()
    assert abs(parts_b["sc_cos"].item() - want_cos) <= cosine_error(8) + gamma(6) * want_cos
    # relation + 2 cos in fp32 from its non-negative parts: two roundings
    assert loss_b.item() == pytest.approx(loss3.item() + 2.0 * parts_b["sc_cos"].item(), rel=gamma(2), abs=0)
    # gradient reaches the student only
    teacher = features.clone().requires_grad_(True)
    relation_loss(student * 2 + 1, teacher, region_ids, 3, masked, beta=1.0)[0].backward()
    assert student.grad is not None and teacher.grad is None


def test_affine_inverse_and_warp_by_whole_cells(generator: torch.Generator) -> None:
    theta = random_similarity(4, 15.0, 0.1, 0.1, generator, torch.device("cpu"))
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    square = torch.cat([theta, torch.tensor([[[0, 0, 1.0]]]).expand(4, 1, 3)], dim=1)
    inverse = torch.cat([invert_affine(theta), torch.tensor([[[0, 0, 1.0]]]).expand(4, 1, 3)], dim=1)
    # a similarity is perfectly conditioned, so LU's inverse is off by a few u (measured 2.3 u against
    # float64), and the product sums 3 terms of magnitude <= 1.2: measured worst 2 u over 200 draws; bound 4x
    assert torch.allclose((square @ inverse)[:, :2], identity.expand(4, 2, 3), rtol=0, atol=8 * U32)
    scale = torch.linalg.det(theta[:, :, :2]).sqrt()
    # max_scale 0.1, up to the rounding of the entries (2 u), the det (3 u) and the root: gamma(8) relative
    assert ((scale >= 0.9 * (1 - gamma(8))) & (scale <= 1.1 * (1 + gamma(8)))).all()
    # a shift by exactly two cells of an 8 x 8 map moves the content by two cells
    x = torch.randn(1, 3, 8, 8, generator=generator)
    shift = torch.tensor([[[1.0, 0, 0.5], [0, 1.0, 0]]])  # 0.5 in normalised units = 2 cells
    moved = warp(x, shift)
    assert torch.allclose(moved[..., :6], x[..., 2:], rtol=0, atol=whole_cell_warp_error(8, x))
    assert (moved[..., 6:] == 0).all()


def test_equivariance_loss(generator: torch.Generator) -> None:
    student = torch.randn(2, 6, 8, 8, generator=generator)
    shift = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0]]).expand(2, 2, 3)
    teacher = warp(student, shift)  # what an exactly equivariant teacher sees of view 2
    loss, parts = equivariance_loss(student, teacher, shift, min_overlap=0.99)
    # the teacher's map warped back is the student's up to the warp's rounding above, which moves
    # 1 - cos only at second order: one cosine's rounding over 6 channels (measured worst 0.46 u)
    assert abs(loss.item()) <= cosine_error(6)
    assert parts["sc_overlap"].item() == 6 / 8, "a mean of 0 / 1 over 2 x 8 x 8 cells: exact"
    unrelated, _ = equivariance_loss(student, torch.randn(2, 6, 8, 8, generator=generator), shift, 0.99)
    # 1 - cos of independent Gaussian maps has mean 1; measured over 200 seeds: mean 0.997, sd 0.040, min 0.908,
    # so 0.5 is 12 sd below the mean while an equivariant teacher scores a few u
    assert unrelated.item() > 0.5


def test_ema_update() -> None:
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.25)
    for t, a, s in zip(teacher.parameters(), t0, student.parameters()):
        assert ((t.double() - (0.25 * a.double() + 0.75 * s.double())).abs() <= lerp_error(a, s)).all()
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


def _centroids64(region_ids: torch.Tensor, grid: int, num_regions: int) -> torch.Tensor:
    """(B, G, 2) float64 centroids (x, y) / grid of each region's cell centres by a loop (0 when absent)."""
    cells = torch.arange(grid * grid)
    coords = torch.stack([cells % grid, cells // grid], dim=-1).double().add(0.5).div(grid)
    out = torch.zeros(region_ids.shape[0], num_regions, 2, dtype=torch.float64)
    for b in range(region_ids.shape[0]):
        for g in range(num_regions):
            members = region_ids[b] == g
            if members.any():
                out[b, g] = coords[members].mean(dim=0)
    return out


def test_region_centroids_match_a_loop(generator: torch.Generator) -> None:
    region_ids = _faces_region_ids(3, generator, grid=7)
    centroids, present = region_centroids(region_ids, 7, 14)
    for b in range(3):
        for g in range(14):
            cells = torch.nonzero(region_ids[b] == g).flatten()
            assert present[b, g] == (cells.numel() > 0)
            if cells.numel():
                want = torch.stack([(cells % 7).double() + 0.5, (cells // 7).double() + 0.5], -1).mean(0) / 7
                # coordinates (c + 0.5) / 7 round once, their mean of n positive terms gamma(n) more
                # (measured worst 1.9 u)
                torch.testing.assert_close(centroids[b, g].double(), want, rtol=gamma(cells.numel() + 1), atol=0)


def test_layout_loss_scores_the_relative_layout(generator: torch.Generator) -> None:
    region_ids = _faces_region_ids(16, generator)
    head = LayoutHead(8, 14, 8)
    pairs = head.pairs
    centroids, present = region_centroids(region_ids, 14, 14)
    truth = centroids[:, pairs[1]] - centroids[:, pairs[0]]
    floor = (0.25 / 14) ** 2
    # the library's own offsets (the same fp32 values, centred by the same ops) score exactly 0
    assert layout_loss(truth, region_ids, pairs, 14, 14)[0].item() == 0.0
    # shifted by a constant per pair (only the differences between faces count): the shift's addition and
    # the centring (a mean of 16 faces and a subtraction) put each centred offset within (16 + 3) u max|x| of
    # the target's, which is centred as roundly: an error e <= 2 (16 + 3) u max|x|, scored e^2 / floor at most
    shifted = truth + torch.randn(1, pairs.shape[1], 2, generator=generator)
    error = 2 * (16 + 3) * U32 * shifted.abs().max().item()
    assert 0.0 <= layout_loss(shifted, region_ids, pairs, 14, 14)[0].item() <= error**2 / floor
    # one layout for every face scores the variance share: var / (var + floor), below 1, here against the
    # offsets of float64 centroids of the region maps
    same = truth.mean(dim=0, keepdim=True).expand_as(truth).clone().requires_grad_(True)
    loss, parts = layout_loss(same, region_ids, pairs, 14, 14)
    truth64 = _centroids64(region_ids, 14, 14)[:, pairs[1]] - _centroids64(region_ids, 14, 14)[:, pairs[0]]
    variance = (truth64 - truth64.mean(0)).square().mean(0)
    # a variance of centroid offsets can be tiny against its rounding, so no useful worst case: measured
    # worst 3.3 u relative over 150 seeds, bound 3.6x that
    assert loss.item() == pytest.approx((variance / (variance + floor)).mean().item(), rel=12 * U32, abs=0)
    # a share var / (var + floor) is below 1; measured over 200 jittered batches: 0.76-0.85 (mean 0.817,
    # sd 0.018), so 0.3 is far below any and 1 the bound by construction
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
    assert layout_loss(exact, region_ids, pairs, 14, 14)[0].item() == 0.0, "the library's own offsets: exact"


def test_layout_head_shapes() -> None:
    head = LayoutHead(32, 14, 16)
    assert head.pairs.shape == (2, 91) and (head.pairs[0] < head.pairs[1]).all()
    assert head(torch.randn(5, 32)).shape == (5, 91, 2)
