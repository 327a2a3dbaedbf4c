"""Codebook: EMA / Laplace smoothing / dead-code semantics on hand-checked numbers, and parity with
the vector-quantize-pytorch update rule (re-stated here with a one-hot matrix, as it computes it)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pacofr.models.codebook import Codebook, pick_distinct_seeds


def make_codebook(codes, **kwargs) -> Codebook:
    cb = Codebook(codes.shape[0], codes.shape[1], **kwargs)
    with torch.no_grad():
        cb.weight.copy_(codes)
        cb.ema_sums.copy_(codes)
    return cb


def test_ema_laplace_and_dead_codes_by_hand():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cb = make_codebook(codes, decay=0.5, eps=0.1, dead_code_threshold=1.0, use_cosine=False)
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    cb.ema_update(x, torch.tensor([0, 0, 1]))
    # batch counts [2, 1, 0], sums [[6, 0], [0, 3], [0, 0]]; lerp by 0.5 from counts 0 / sums = codes
    torch.testing.assert_close(cb.ema_counts, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(cb.ema_sums, torch.tensor([[3.5, 0.0], [0.0, 2.0], [2.5, 2.5]]))
    # Laplace: (c + 0.1) / (1.5 + 3 * 0.1) * 1.5 = [11/12, 1/2, 1/12]
    torch.testing.assert_close(cb.weight.detach(), torch.tensor([[3.5 * 12 / 11, 0.0], [0.0, 4.0], [30.0, 30.0]]))
    assert cb.dead_codes().tolist() == [False, True, True]
    # one candidate vector seeds one code, never two: the other dead code waits for another vector
    restarted = cb.restart_dead_codes(torch.tensor([[9.0, 8.0], [9.0, 8.0]]))
    assert restarted.tolist() == [False, True, False]
    torch.testing.assert_close(cb.weight.detach(), torch.tensor([[3.5 * 12 / 11, 0.0], [9.0, 8.0], [30.0, 30.0]]))
    torch.testing.assert_close(cb.ema_counts, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(cb.ema_sums, torch.tensor([[3.5, 0.0], [9.0, 8.0], [2.5, 2.5]]))
    restarted = cb.restart_dead_codes(torch.tensor([[9.0, 8.0], [-7.0, 1.0]]))  # a copy of a live code is skipped
    assert restarted.tolist() == [False, False, True]
    torch.testing.assert_close(cb.weight.detach()[2], torch.tensor([-7.0, 1.0]))
    assert not cb.dead_codes().any()


def test_weighted_multi_candidate_update_by_hand():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cb = make_codebook(codes, decay=0.0, eps=1e-5, use_cosine=False)  # decay 0: EMA = this batch
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    indices = torch.tensor([[0, 1], [1, 0]])
    weights = torch.tensor([[0.75, 0.25], [1.0, 0.0]])  # the 0 weight excludes that entry
    cb.ema_update(x, indices, weights)
    torch.testing.assert_close(cb.ema_counts, torch.tensor([0.75, 1.25]))
    torch.testing.assert_close(cb.ema_sums, torch.tensor([[1.5, 0.0], [0.5, 4.0]]))
    total, eps = 2.0, 1e-5
    smoothed = (torch.tensor([0.75, 1.25]) + eps) / (total + 2 * eps) * total
    torch.testing.assert_close(cb.weight.detach(), torch.tensor([[1.5, 0.0], [0.5, 4.0]]) / smoothed[:, None])


def vqp_style_step(embed, embed_avg, cluster_size, x, ind, decay, eps, cosine):
    """vector-quantize-pytorch's EMA step, as it writes it (one-hot matrix, lerp, Laplace)."""
    k = embed.shape[0]
    if cosine:
        x = F.normalize(x, dim=-1)
    onehot = F.one_hot(ind, k).float()
    cluster_size = cluster_size.lerp(onehot.sum(0), 1 - decay)
    embed_avg = embed_avg.lerp(onehot.T @ x, 1 - decay)
    smoothed = (cluster_size + eps) / (cluster_size.sum() + k * eps) * cluster_size.sum()
    embed = embed_avg / smoothed[:, None]
    if cosine:
        embed = F.normalize(embed, dim=-1)
    return embed, embed_avg, cluster_size


@pytest.mark.parametrize("cosine", [True, False])
def test_parity_with_vector_quantize_pytorch_rule(cosine, generator):
    k, d = 12, 6
    cb = Codebook(k, d, decay=0.8, eps=1e-5, use_cosine=cosine)
    embed, embed_avg, cluster = cb.weight.detach().clone(), cb.ema_sums.clone(), cb.ema_counts.clone()
    for _ in range(4):
        x = torch.randn(50, d, generator=generator)
        ind = torch.randint(k, (50,), generator=generator)
        cb.ema_update(x, ind)
        embed, embed_avg, cluster = vqp_style_step(embed, embed_avg, cluster, x, ind, 0.8, 1e-5, cosine)
        torch.testing.assert_close(cb.ema_counts, cluster)
        torch.testing.assert_close(cb.ema_sums, embed_avg)
        torch.testing.assert_close(cb.weight.detach(), embed)


def test_all_reduce_hook_sees_raw_statistics():
    seen = []

    def fake_all_reduce(t):  # two identical ranks
        seen.append(t.clone())
        t.mul_(2)

    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cb = make_codebook(codes, decay=0.0, use_cosine=False)
    cb.all_reduce = fake_all_reduce
    cb.ema_update(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
    assert seen[0].tolist() == [1.0, 0.0] and seen[1].tolist() == [[3.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(cb.ema_counts, torch.tensor([2.0, 0.0]))


def test_restart_draws_distinct_candidates_and_keeps_live_codes(generator):
    cb = Codebook(6, 4, dead_code_threshold=0.5, use_cosine=True)
    with torch.no_grad():
        cb.ema_counts.copy_(torch.tensor([1.0, 0.0, 2.0, 0.1, 0.7, 0.0]))
    before = cb.weight.detach().clone()
    candidates = F.normalize(torch.randn(10, 4, generator=generator), dim=1)
    dead = cb.restart_dead_codes(candidates, generator=generator)
    assert dead.tolist() == [False, True, False, True, False, True]
    assert torch.equal(cb.weight.detach()[~dead], before[~dead])
    new = cb.weight.detach()[dead]
    matches = (new[:, None, :] - candidates[None]).abs().amax(-1) < 1e-6
    assert (matches.sum(1) == 1).all()  # each restarted code is one candidate
    assert len(set(matches.float().argmax(1).tolist())) == 3  # drawn without replacement
    assert (cb.ema_counts[dead] == 0.5).all()
    torch.testing.assert_close(cb.ema_sums[dead], new * 0.5)
    assert torch.equal(cb.restart_dead_codes(torch.empty(0, 4)), torch.zeros(6, dtype=torch.bool))


@pytest.mark.parametrize("cosine", [True, False])
def test_restarts_from_clustered_candidates_are_distinct(cosine, generator):
    """Many copies of a few vectors (a batch of near-identical patches) seed each vector at most once,
    and never a copy of a code that stays."""
    k, d = 24, 8
    cb = Codebook(k, d, dead_code_threshold=0.5, use_cosine=cosine)
    live = torch.arange(k) < 4
    with torch.no_grad():
        cb.ema_counts.copy_(live.float())
    distinct = torch.randn(5, d, generator=generator) * 3
    candidates = torch.cat([distinct.repeat(40, 1), cb.codes().detach()[:4].repeat(10, 1)])
    candidates = candidates[torch.randperm(candidates.shape[0], generator=generator)]
    restarted = cb.restart_dead_codes(candidates, generator=generator)
    assert restarted.sum() == 5, "five distinct vectors can seed five codes; the other dead codes wait"
    codes = cb.codes().detach()
    gaps = torch.cdist(codes, codes) + torch.eye(k) * 1e9
    assert gaps[restarted].min() > 1e-3, "two codes were seeded from one vector (or from a live code)"
    assert cb.dead_codes().sum() == k - 4 - 5


def test_pick_distinct_seeds_follows_squared_distances(generator):
    """k-means++ seeding: rows far from the centres are picked before rows next to them."""
    centres = torch.zeros(1, 4)
    near = torch.randn(200, 4, generator=generator) * 0.01
    far = torch.eye(4) * 10.0
    candidates = torch.cat([near, far])
    picks = pick_distinct_seeds(candidates, centres, 4, generator=generator)
    assert sorted(picks.tolist()) == [200, 201, 202, 203]
    assert pick_distinct_seeds(candidates, centres, 0).numel() == 0
    assert pick_distinct_seeds(candidates[:0], centres, 3).numel() == 0
    spread = torch.eye(4).repeat(3, 1) * torch.arange(1.0, 13.0).unsqueeze(1)  # 12 distinct rows
    everything = pick_distinct_seeds(spread, spread[:0], 500, generator=generator)
    assert sorted(everything.tolist()) == list(range(12))


def test_threshold_zero_disables_dead_codes():
    cb = Codebook(5, 3, dead_code_threshold=0.0)
    assert not cb.dead_codes().any()


def test_usage_entropy_and_perplexity():
    k = 8
    uniform = torch.full((5, k), 1.0 / k)
    assert math.isclose(float(Codebook.usage_entropy(uniform)), math.log(k), rel_tol=1e-6)
    assert math.isclose(float(Codebook.perplexity(uniform)), k, rel_tol=1e-5)
    one_code = F.one_hot(torch.zeros(5, dtype=torch.long), k).float()
    assert float(Codebook.usage_entropy(one_code)) == 0.0
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])  # p = [3/4, 1/4]
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(Codebook.usage_entropy(counts)), want, rel_tol=1e-6)
    logits = torch.randn(6, k, requires_grad=True)
    Codebook.usage_entropy(logits.softmax(-1)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_forward_uses_normalised_codes_and_metric(generator):
    cb = Codebook(10, 6, use_cosine=True)
    with torch.no_grad():
        cb.weight.mul_(3.0)  # un-normalise the parameter: tokens must still be unit vectors
    q = torch.randn(4, 6, generator=generator)
    token, idx, w = cb(q, 1, 0.1)
    torch.testing.assert_close(token.norm(dim=1), torch.ones(4))
    token.sum().backward()
    assert cb.weight.grad is not None
    assert Codebook(3, 2, use_cosine=False).metric == "l2"


@pytest.mark.parametrize("kwargs,pattern", [
    ({"decay": 1.5}, "decay must lie in"), ({"eps": 0.0}, "eps must be positive"),
    ({"dead_code_threshold": -1.0}, "dead_code_threshold must be >= 0"),
])
def test_bad_config_is_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Codebook(4, 2, **kwargs)


def test_bad_update_inputs_are_named():
    cb = Codebook(4, 3)
    with pytest.raises(ValueError, match="x must have 3 columns"):
        cb.ema_update(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, K\)"):
        cb.ema_update(torch.randn(5, 3), torch.full((5,), 4))
    with pytest.raises(ValueError, match="candidates must have 3 columns"):
        cb.restart_dead_codes(torch.randn(5, 2))
