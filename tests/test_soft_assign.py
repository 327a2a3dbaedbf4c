"""soft_assign and codebook_stats: every backend against an independent float64 oracle.

The oracle ranks codes with numpy's lexsort on (-score, index) in float64, so the tie rule is
checked independently of the implementations (group minima + topk / packed keys). Indices are compared
the way FAISS/flash-kmeans tests do (kernels.md, pitfall 2): the oracle scores at the returned
indices must equal the oracle's top-m scores within a tolerance, and the indices must be equal
where the top-(m+1) scores are separated by more than that tolerance. Weights, tokens and
gradients are compared with the oracle evaluated at the returned indices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _oracles import (
    assert_close_rel,
    assert_weights_close,
    check_selection,
    oracle_given,
    recorded_sorts,
    select_top_m_sorted,
    sorted_share,
    stats_oracle,
)
from _oracles import soft_assign_scores64 as oracle_scores
from _tolerances import U16, U32, UBF16, gamma
from pacofr.ops import BackendUnavailableError, _launch
from pacofr.ops.soft_assign import codebook_stats, select_top_m, soft_assign, soft_assign_reference


HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
FUSED = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# where each backend's inputs live: triton runs CUDA tensors on a GPU machine, CPU tensors under
# the interpreter otherwise (conftest sets TRITON_INTERPRET=1 without a GPU)
DEVICE = {"torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METRICS = ["cosine", "l2"]
ROUNDING = {torch.float32: 0.0, torch.float16: 2 * U16, torch.bfloat16: 2 * UBF16}
"""The last rounding of a result computed in fp32 into the input's dtype, relative: one ulp (2u), since
Triton's interpreter truncates fp32 to bf16 instead of rounding to nearest (0 for fp32 results)."""
GRAD_REL = 64 * U32
"""Gradients w.r.t. q and the codebook computed in fp32 (16-bit inputs upcast exactly), against float64 at the
same indices, relative to the largest: 4.5x the worst measured, 14.2 U32 (q, cosine; codebook 5.5 U32), over
260 seeds x torch and triton (interpreter) of test_backward_matches_oracle's clustered inputs (60 of them in
every dtype, the final rounding into 16 bits set apart)."""
TAU_GRAD_REL = 4 * U32
"""The gradient w.r.t. tau relative to :func:`tau_grad_scale` (the size of the terms it sums, which cancel:
relative to itself it was off by up to 1111 U32): 4.7x the worst measured, 0.84 U32, on the 60 seeds x
every dtype above."""


def selection_tol(q: torch.Tensor, cb: torch.Tensor, metric: str) -> float:
    """The largest gap between two oracle scores (cosine, or -||q - e||^2) that a correct fp32 ranking may
    invert: twice the worst error of one ranking score (Higham's dot-product bound on the exact input values,
    16-bit inputs upcast exactly).

    cosine ranks by (q . e) / ||e||: the dot is off by gamma(D) ||q|| ||e||, the inverse norm (D squares
    summed, sqrt, reciprocal) by gamma(D) / 2 + 2u relative, the product by u: at most gamma(2D) ||q|| (D >= 6),
    gamma(2D) in cosine units. l2 ranks by 2 q.e - ||e||^2 (the fused kernels by half of it): at most
    gamma(D + 1) (2 ||q|| ||e|| + ||e||^2).
    """
    dim = q.shape[-1]
    if metric == "cosine":
        return 2 * gamma(2 * dim)
    q_norm = q.double().reshape(-1, dim).norm(dim=1).max().item()
    e_norm = cb.double().norm(dim=1).max().item()
    return 2 * gamma(dim + 1) * (2 * q_norm * e_norm + e_norm**2)


def tau_grad_scale(q64: torch.Tensor, cb64: torch.Tensor, idx: torch.Tensor, tau: float, metric: str,
                   g_token: torch.Tensor, g_weights: torch.Tensor) -> float:
    """``sum_ij |G_ij z_ij| / tau`` in float64, with z = raw / tau the logits of the chosen codes and G the
    gradient of ``<g_token, token> + <g_weights, weights>`` w.r.t. them: the gradient w.r.t. tau is
    ``-sum_ij G_ij z_ij / tau``, so this is the sum of its terms' magnitudes; floored at 1e-3 as
    :func:`assert_close_rel` floors its scale (a saturated softmax has vanishing terms)."""
    with torch.enable_grad():
        logits = (oracle_scores(q64.detach(), cb64.detach(), metric).gather(1, idx) / tau).requires_grad_()
        weights = torch.softmax(logits, dim=1)
        token = (weights[..., None] * cb64.detach().cpu()[idx]).sum(1)
        objective = (token * g_token.double()).sum() + (weights * g_weights.double()).sum()
        (g_logits,) = torch.autograd.grad(objective, logits)
    return max((g_logits * logits).abs().sum().item() / tau, 1e-3)


def assert_token_close(token: torch.Tensor, want_token: torch.Tensor, token_atol: float, cb: torch.Tensor,
                       m: int) -> None:
    """token = sum_j w_j e_j of m candidates against float64 at the same indices: the weights' error gives
    ``token_atol`` (:func:`assert_weights_close`), the fp32 sum of m products (weights summing to 1) adds
    gamma(m) max|e|, the rounding to the token's dtype :data:`ROUNDING` of its size."""
    fp32 = token_atol + gamma(m) * cb.double().abs().max().item()
    rounding = ROUNDING[token.dtype]
    assert_close_rel(token, want_token, rounding, "token", atol=fp32 * (1 + rounding))


def make_inputs(n, k, d, dtype, generator, kind="gauss"):
    cb = torch.randn(k, d, generator=generator)
    if kind == "clustered":
        assign = torch.randint(k, (n,), generator=generator)
        sigma = 10 ** -torch.randint(1, 4, (n, 1), generator=generator).double()
        q = cb[assign] + sigma.float() * torch.randn(n, d, generator=generator)
    else:
        q = torch.randn(n, d, generator=generator)
    return q.to(dtype), cb.to(dtype)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def run(backend, q, cb, m, tau, **kwargs):
    """soft_assign on the backend's device (differentiable moves), results back on the CPU."""
    device = DEVICE[backend]
    out = soft_assign(_to(q, device), _to(cb, device), m, _to(tau, device), backend=backend, **kwargs)
    return type(out)(*(t.cpu() for t in out))


def run_stats(backend, indices, k, **kwargs):
    device = DEVICE[backend]
    out = codebook_stats(indices.to(device), k, backend=backend, **{n: _to(v, device) for n, v in kwargs.items()})
    return type(out)(*(None if t is None else t.cpu() for t in out))


def assert_stats_close(got, indices, k, weights, x, backend):
    """codebook_stats' fp32 ``got`` against :func:`stats_oracle` (float64), with derived bounds.

    Counts: unit weights give integers below 2^24, exact; weights (>= 0) are summed in fp64 and rounded once
    to fp32 on torch and triton (u relative, plus the fp64 sums' gamma(n) in 2^-53 on both sides), in fp32
    by the cuda kernel (gamma(n) relative). Sums: per code, fp32 products w x (u) summed in any order over its
    c entries: within gamma(c + 1) of the code's sum of |w x| (float64 oracle rounding included).
    """
    want_counts, want_sums = stats_oracle(indices, k, weights, x)
    entries = max(indices.numel(), 1)
    if weights is None:
        assert torch.equal(got.counts.double(), want_counts)
    else:
        rtol = gamma(entries + 1) if backend == "cuda" else U32 + 3 * gamma(entries, 2.0**-53)
        torch.testing.assert_close(got.counts.double(), want_counts, rtol=rtol, atol=0)
    if x is None:
        assert got.sums is None
        return
    per_code = torch.bincount(indices.reshape(-1).long(), minlength=k).tolist()
    _, abs_sums = stats_oracle(indices, k, weights, x.abs())
    bound = torch.tensor([gamma(c + 1) for c in per_code], dtype=torch.float64)[:, None] * abs_sums
    excess = (got.sums.double() - want_sums).abs() - bound
    assert (excess <= 0).all(), f"sums off by {excess.max().item():.3g} beyond the bound"


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d,m", [(1, 1, 8, 1), (7, 7, 48, 3), (129, 33, 8, 4), (33, 100, 96, 8),
                                     (7, 33, 96, 16)])
@pytest.mark.parametrize("kind", ["gauss", "clustered"])
def test_forward_matches_oracle_fp32(backend, n, k, d, m, kind, generator):
    tau = 0.1
    m = min(m, k)
    for metric in METRICS:
        q, cb = make_inputs(n, k, d, torch.float32, generator, kind)
        token, idx, w = run(backend, q, cb, m, tau, metric=metric)
        check_selection(idx, q, cb, m, metric, atol=selection_tol(q, cb, metric))
        assert w.dtype == torch.float32 and token.dtype == torch.float32
        want_token, token_atol = assert_weights_close(w, q, cb, idx, tau, metric)
        assert_token_close(token, want_token, token_atol, cb, m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_forward_every_dtype(backend, dtype, metric, generator):
    q, cb = make_inputs(37, 45, 40, dtype, generator, "clustered")
    token, idx, w = run(backend, q, cb, 4, 0.2, metric=metric)
    # the oracle runs on the same low-precision values, upcast exactly
    check_selection(idx, q, cb, 4, metric, atol=selection_tol(q, cb, metric))
    assert token.dtype == dtype and w.dtype == torch.float32
    want_token, token_atol = assert_weights_close(w, q, cb, idx, 0.2, metric)
    assert_token_close(token, want_token, token_atol, cb, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_inputs(backend, generator):
    base = torch.randn(20, 3, 6, generator=generator)
    q = base.permute(1, 0, 2)[:, 2:17]  # (3, 15, 6), non-contiguous
    cb = torch.randn(40, 6, generator=generator)[::2]  # (20, 6) strided rows
    assert not q.is_contiguous() and not cb.is_contiguous()
    token, idx, w = run(backend, q, cb, 3, 0.5, metric="l2")
    assert token.shape == (3, 15, 6) and idx.shape == (3, 15, 3) and w.shape == (3, 15, 3)
    flat_q, flat_idx = q.reshape(-1, 6), idx.reshape(-1, 3)
    check_selection(flat_idx, flat_q, cb, 3, "l2", atol=selection_tol(flat_q, cb, "l2"))
    want_token, token_atol = assert_weights_close(w.reshape(-1, 3), flat_q, cb, flat_idx, 0.5, "l2")
    assert_token_close(token.reshape(-1, 6), want_token, token_atol, cb, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_smaller_index_and_get_equal_weights(backend, metric):
    # exactly representable values: every implementation computes these scores exactly
    cb = torch.zeros(100, 8)
    cb[:, 0] = -4.0
    cb[torch.arange(100), torch.arange(100) % 8] += 1.0  # background codes, all worse
    target = torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0])
    for j in (70, 3, 95, 40):  # duplicates spread over several code tiles
        cb[j] = target
    q = target.repeat(5, 1)
    token, idx, w = run(backend, q, cb, 4, 0.3, metric=metric)
    assert idx.tolist() == [[3, 40, 70, 95]] * 5
    assert torch.equal(w, torch.full_like(w, 0.25))
    assert torch.equal(token, q)  # 4 x (0.25 x small integers): every product and sum exact
    # m = 2 cuts inside the tie: the two smallest indices win
    _, idx2, w2 = run(backend, q, cb, 2, 0.3, metric=metric)
    assert idx2.tolist() == [[3, 40]] * 5 and torch.equal(w2, torch.full_like(w2, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_query_ties_everywhere_under_cosine(backend):
    cb = torch.randn(33, 16)
    q = torch.zeros(3, 16)
    token, idx, w = run(backend, q, cb, 5, 0.1, metric="cosine")
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
    # five scores exactly 0: every weight is exp(0) / 5 = 1 / 5, correctly rounded on the CPU (fp32's 0.2
    # exactly); on a GPU, Triton's fp32 division compiles to div.full.f32, within 2 ulp (2 x 2u relative)
    if torch.device(DEVICE[backend]).type == "cuda":  # run() returns the results on the CPU
        torch.testing.assert_close(w, torch.full_like(w, 0.2), rtol=4 * U32, atol=0)
    else:
        assert torch.equal(w, torch.full_like(w, 0.2))
    # token = sum of 5 products 0.2 e_j: the weights' error (u on the CPU, 4u on a GPU) and the sum (gamma(5))
    # of terms at most max|e|
    atol = gamma(9) * cb[:5].abs().max().item()
    torch.testing.assert_close(token.double(), cb[:5].double().mean(0).expand(3, -1), atol=atol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_m1_is_hard_assignment_and_small_tau_approaches_it(backend, metric, generator):
    q, cb = make_inputs(50, 30, 24, torch.float32, generator)
    token, idx, w = run(backend, q, cb, 1, 0.7, metric=metric)
    check_selection(idx, q, cb, 1, metric, atol=selection_tol(q, cb, metric))
    assert torch.equal(w, torch.ones_like(w))
    assert torch.equal(token, cb[idx[:, 0]])
    token4, idx4, w4 = run(backend, q, cb, 4, 1e-5, metric=metric)
    assert torch.equal(idx4[:, :1], idx)
    gap = oracle_scores(q, cb, metric).gather(1, idx4)
    clear = (gap[:, 0] - gap[:, 1]) > 1e-3  # 1e-3 / 1e-5 = 100: weight of the rest < 4 e^-100
    assert clear.any()
    # 1 / (1 + 4 e^-100) rounds to 1 exactly, and e_0 + (< 4 e^-100) |e| to e_0: the hard answer, bit for bit
    assert torch.equal(w4[clear, 0], torch.ones_like(w4[clear, 0]))
    assert torch.equal(token4[clear], cb[idx[clear, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_m_equal_k_is_the_full_softmax(backend, metric, generator):
    q, cb = make_inputs(9, 13, 20, torch.float32, generator)
    token, idx, w = run(backend, q, cb, 13, 0.4, metric=metric)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(13).expand(9, 13))  # every code once
    # with every code a candidate, the float64 oracle at the returned indices is the full softmax
    _, token_atol = assert_weights_close(w, q, cb, idx, 0.4, metric)
    assert (w[:, :-1] >= w[:, 1:]).all()  # best first
    full = torch.softmax(oracle_scores(q, cb, metric) / 0.4, dim=1)
    assert_token_close(token, full @ cb.double(), token_atol, cb, 13)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("codes", [1, 40, 256, 4096 + 33])
def test_torch_ranking_equals_the_sort_oracle_on_exact_l2_data(dtype, codes, generator):
    """Integer data make every l2 ranking score exact, so the sort-free ranking must return the
    oracle's indices bit for bit: ties everywhere, duplicate codes, NaN and inf in rows and codes."""
    q = torch.randint(-2, 3, (61, 12), generator=generator).to(dtype)
    cb = torch.randint(-2, 3, (codes, 12), generator=generator).to(dtype)
    cb[codes // 2:codes // 2 + 3] = cb[min(3, codes - 1)]
    if codes > 8:
        cb[5, 1] = float("nan")
        cb[6, 0] = float("inf")
    q[7] = cb[min(3, codes - 1)]
    q[9, 4] = float("nan")
    q[10, 2] = float("-inf")
    every_m = range(1, min(codes, 16) + 1)
    for m in every_m if codes <= 256 else (1, 2, 7, 16):
        got, want = select_top_m(q, cb, m, "l2"), select_top_m_sorted(q, cb, m, "l2")
        assert torch.equal(got, want), f"m={m}: rows {(got != want).any(1).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_torch_ranking_on_large_codebooks_matches_float64(dtype, metric, generator):
    """Codebooks wide enough for every path of the sort-free selection (runs, groups, ragged tail)."""
    for n, k, d, ms in [(60, 4096 + 33, 16, (1, 4, 16)), (40, 1000, 24, (2, 8))]:
        q, cb = make_inputs(n, k, d, dtype, generator, "clustered")
        for m in ms:
            idx = select_top_m(q, cb, m, metric)
            check_selection(idx, q, cb, m, metric, atol=selection_tol(q, cb, metric))


@pytest.mark.parametrize("m", [1, 4])
def test_torch_ranking_sorts_no_block(m, generator, monkeypatch):
    """Continuous data: beyond the 2m-value merges of code blocks, only the rare rows with an exact
    tie among their best scores are sorted (the old ranking sorted every score)."""
    q, cb = make_inputs(300, 9000, 16, torch.float32, generator)
    with recorded_sorts(monkeypatch) as sorts:
        token, idx, _ = soft_assign(q, cb, m, 0.1, backend="torch")
    assert sorted_share(sorts, 2 * m, 300 * 9000) <= 0.02, f"sorted: {sorts}"
    check_selection(idx, q, cb, m, "cosine", atol=selection_tol(q, cb, "cosine"))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_gives_nan_weights_and_nan_code_is_never_chosen(backend, generator):
    q, cb = make_inputs(6, 20, 16, torch.float32, generator)
    q[2, 5] = float("nan")
    cb[7, 0] = float("nan")
    for metric in METRICS:
        token, idx, w = run(backend, q, cb, 3, 0.5, metric=metric)
        assert torch.isnan(w[2]).all() and torch.isnan(token[2]).all()
        assert ((idx >= 0) & (idx < 20)).all()
        ok = torch.tensor([0, 1, 3, 4, 5])
        assert not (idx[ok] == 7).any()
        assert torch.isfinite(w[ok]).all() and torch.isfinite(token[ok]).all()
        keep = torch.tensor([i for i in range(20) if i != 7])
        kept = idx[ok] - (idx[ok] > 7).long()
        check_selection(kept, q[ok], cb[keep], 3, metric, selection_tol(q[ok], cb[keep], metric))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_token_of_a_nan_row_is_nan(backend, generator):
    """Found by the fuzz suite: the hard forward token hid a NaN query (an arbitrary code row came out)."""
    q, cb = make_inputs(6, 20, 16, torch.float32, generator)
    q[2, 5] = float("nan")
    for metric in METRICS:
        token, idx, w = run(backend, q, cb, 3, 0.5, metric=metric, straight_through=True)
        assert torch.isnan(token[2]).all() and torch.isnan(w[2]).all()
        ok = torch.tensor([0, 1, 3, 4, 5])
        assert torch.equal(token[ok], cb[idx[ok, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries(backend):
    cb = torch.randn(10, 8, requires_grad=True)
    q = torch.randn(0, 8, requires_grad=True)
    tau = torch.tensor(0.2, requires_grad=True)
    token, idx, w = run(backend, q, cb, 3, tau)
    assert token.shape == (0, 8) and idx.shape == (0, 3) and w.shape == (0, 3)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    (token.sum() + w.sum()).backward()
    assert torch.equal(cb.grad, torch.zeros_like(cb)) and q.grad.shape == (0, 8)
    assert tau.grad is not None and float(tau.grad) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_tensor_matches_float_and_straight_through_forward_is_hard(backend, generator):
    q, cb = make_inputs(11, 17, 12, torch.float32, generator)
    a = run(backend, q, cb, 3, 0.25)
    b = run(backend, q, cb, 3, torch.tensor(0.25))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, atol=0, rtol=0)
    st = run(backend, q, cb, 3, 0.25, straight_through=True)
    assert torch.equal(st.token, cb[st.indices[:, 0]])
    assert torch.equal(st.weights, a.weights)


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_reference_gradcheck_float64(metric, generator):
    """Soft path only: straight-through is not a derivative (see the test comparing it to soft)."""
    # well separated: codes far apart, queries near distinct codes, so the top-m set is stable
    cb = (3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    q = (cb.detach()[[0, 2, 4, 5]] + 0.3 * torch.randn(4, 5, generator=generator, dtype=torch.float64))
    q.requires_grad_()
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def fn(q_, cb_, tau_):
        token, _, weights = soft_assign_reference(q_, cb_, 3, tau_, metric=metric)
        return token, weights

    # float64 central differences with eps = 1e-6 are off by about 2^-53 |f| / eps ~ 1e-9 (|f| < 10) plus
    # eps^2 / 6 times the third derivative (~ (2 |q - e| / tau)^3 ~ 3e3 here) ~ 1e-9: atol 1e-6 leaves 1000x
    assert torch.autograd.gradcheck(fn, (q, cb, tau), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_backward_matches_oracle(backend, dtype, metric, generator):
    n, k, d, m = 29, 37, 24, 4
    q0, cb0 = make_inputs(n, k, d, dtype, generator, "clustered")
    q = q0.clone().requires_grad_()
    cb = cb0.clone().requires_grad_()
    tau = torch.tensor(0.3, requires_grad=True)
    token, idx, w = run(backend, q, cb, m, tau, metric=metric)
    g_token = torch.randn(n, d, generator=generator).to(dtype)
    g_w = torch.randn(n, m, generator=generator)
    ((token.float() * g_token.float()).sum() + (w * g_w).sum()).backward()

    q64 = q0.double().requires_grad_()
    cb64 = cb0.double().requires_grad_()
    tau64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    want_token, want_w = oracle_given(q64, cb64, idx, tau64, metric)
    ((want_token * g_token.double()).sum() + (want_w * g_w.double()).sum()).backward()
    # fp32 math on exactly upcast inputs, then one rounding into q's dtype (the gradient w.r.t. tau stays fp32)
    rel = GRAD_REL * (1 + ROUNDING[dtype]) + ROUNDING[dtype]
    assert q.grad.dtype == dtype and cb.grad.dtype == dtype
    assert_close_rel(q.grad, q64.grad, rel, "grad q")
    assert_close_rel(cb.grad, cb64.grad, rel, "grad codebook")
    tau_scale = tau_grad_scale(q64, cb64, idx, 0.3, metric, g_token, g_w)
    assert abs(tau.grad.item() - tau64.grad.item()) <= TAU_GRAD_REL * tau_scale, "grad tau"
    # only the chosen rows receive gradient
    untouched = torch.ones(k, dtype=torch.bool)
    untouched[idx.unique()] = False
    assert (cb.grad[untouched] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_backward_equals_soft_backward(backend, generator):
    q0, cb0 = make_inputs(13, 21, 16, torch.float32, generator)
    grads = []
    for st in (False, True):
        q, cb = q0.clone().requires_grad_(), cb0.clone().requires_grad_()
        tau = torch.tensor(0.5, requires_grad=True)
        # deterministic: the same backward computation in the same order, so the two agree bit for bit
        token, _, _ = run(backend, q, cb, 3, tau, metric="cosine", straight_through=st, deterministic=True)
        (token * torch.arange(16.0)).sum().backward()
        grads.append((q.grad, cb.grad, tau.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic_backward_agrees_and_repeats(backend, generator):
    q0, cb0 = make_inputs(70, 9, 16, torch.float32, generator, "clustered")  # many rows per code
    results = []
    for deterministic in (False, True, True):
        q, cb = q0.clone().requires_grad_(), cb0.clone().requires_grad_()
        token, _, _ = run(backend, q, cb, 3, 0.5, metric="l2", deterministic=deterministic)
        (token * token).sum().backward()
        results.append((q.grad, cb.grad))
    # atomics and sorted segments sum each code's terms in other orders: measured worst 2.1 U32 of the largest
    # gradient over 200 seeds (interpreter); 8 U32 is 3.7x that (a GPU's atomic orders are not measured here)
    assert_close_rel(results[0][1], results[1][1], 8 * U32, "atomic vs deterministic codebook gradient")
    assert torch.equal(results[1][1], results[2][1]) and torch.equal(results[1][0], results[2][0])


# ------------------------------------------------------------------------------------------
# Poisoned outputs (fused backends allocate through one hook)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_poisoned_outputs_are_overwritten(backend, deterministic, metric, generator, monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-7)

    q0, cb0 = make_inputs(19, 23, 12, torch.float32, generator)
    clean = []
    for poison in (False, True):
        if poison:
            monkeypatch.setattr(_launch, "new_output", poisoned)
        q, cb = q0.clone().requires_grad_(), cb0.clone().requires_grad_()
        tau = torch.tensor(0.4, requires_grad=True)
        token, idx, w = run(backend, q, cb, 3, tau, metric=metric, deterministic=deterministic)
        (token.sum() + w[:, 1].sum()).backward()
        stats = run_stats(backend, idx, 23, weights=w.detach(), x=q0, deterministic=deterministic)
        clean.append((token, idx, w, q.grad, cb.grad, tau.grad, *stats))
    for a, b in zip(*clean):
        assert torch.equal(a, b)  # same kernels, same inputs: poisoning must change nothing
    assert torch.isfinite(clean[1][0]).all()


# ------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda q, cb: soft_assign(q.double(), cb, 2, 0.1), TypeError, "q must have dtype"),
    (lambda q, cb: soft_assign(q, cb.half(), 2, 0.1), TypeError, "codebook has dtype"),
    (lambda q, cb: soft_assign(q, cb[:, :3], 2, 0.1), ValueError, "q's last dimension"),
    (lambda q, cb: soft_assign(q, cb[:0], 1, 0.1), ValueError, "codebook must be a non-empty"),
    (lambda q, cb: soft_assign(q, cb[0], 1, 0.1), ValueError, "codebook must have 2 dimensions"),
    (lambda q, cb: soft_assign(q[0, 0, 0], cb, 1, 0.1), ValueError, "q must have at least 1 dimension"),
    (lambda q, cb: soft_assign(q, cb, 0, 0.1), ValueError, "m must be >= 1"),
    (lambda q, cb: soft_assign(q, cb, 6, 0.1), ValueError, "m must be <= 5"),
    (lambda q, cb: soft_assign(q, cb, 2.0, 0.1), TypeError, "m must be an int"),
    (lambda q, cb: soft_assign(q, cb, 2, 0.0), ValueError, "tau must be a positive"),
    (lambda q, cb: soft_assign(q, cb, 2, float("nan")), ValueError, "tau must be a positive"),
    (lambda q, cb: soft_assign(q, cb, 2, True), TypeError, "tau must be"),
    (lambda q, cb: soft_assign(q, cb, 2, torch.ones(2)), ValueError, "tau must be a number or a 0-d"),
    (lambda q, cb: soft_assign(q, cb, 2, torch.tensor(1)), TypeError, "tau must be a floating"),
    (lambda q, cb: soft_assign(q, cb, 2, torch.tensor(0.1, device="meta")), ValueError, "tau is on meta"),
    (lambda q, cb: soft_assign(q, cb, 2, 0.1, metric="dot"), ValueError, "metric must be one of"),
    (lambda q, cb: soft_assign(q, cb, 2, 0.1, straight_through=1), TypeError, "straight_through must be a bool"),
    (lambda q, cb: soft_assign(q, cb, 2, 0.1, backend="gpu"), ValueError, "backend must be one of"),
    (lambda q, cb: soft_assign(q, cb.to("meta"), 2, 0.1), ValueError, "codebook is on meta"),
    (lambda q, cb: codebook_stats(torch.zeros(3), 5), TypeError, "indices must have dtype"),
    (lambda q, cb: codebook_stats(torch.zeros(3, 2, 1, dtype=torch.long), 5), ValueError, "indices must have 1 or 2"),
    (lambda q, cb: codebook_stats(torch.zeros(3, dtype=torch.long), 0), ValueError, "K must be >= 1"),
    (lambda q, cb: codebook_stats(torch.tensor([0, 5]), 5), ValueError, r"indices must lie in \[0, K\)"),
    (lambda q, cb: codebook_stats(torch.tensor([0, -1]), 5), ValueError, r"indices must lie in \[0, K\)"),
    (lambda q, cb: codebook_stats(torch.zeros(3, 2, dtype=torch.long), 5, weights=torch.ones(3)), ValueError,
     "weights must have the shape of indices"),
    (lambda q, cb: codebook_stats(torch.zeros(3, dtype=torch.long), 5, x=torch.ones(4, 2)), ValueError,
     "x must have one row per row of indices"),
    (lambda q, cb: codebook_stats(torch.zeros(3, dtype=torch.long), 5, weights=torch.ones(3, dtype=torch.long)),
     TypeError, "weights must have dtype"),
])
def test_bad_arguments_are_named(call, exc, pattern):
    q, cb = torch.randn(4, 6, 8), torch.randn(5, 8)
    with pytest.raises(exc, match=pattern):
        call(q, cb)


def test_triton_rejects_m_above_the_fused_limit_but_auto_falls_back():
    q, cb = torch.randn(4, 8, device=DEVICE["triton"]), torch.randn(40, 8, device=DEVICE["triton"])
    with pytest.raises(BackendUnavailableError, match="soft_assign: backend 'triton' keeps at most 16 candidates"):
        soft_assign(q, cb, 17, 0.1, backend="triton")
    token, idx, w = soft_assign(q, cb, 17, 0.1)
    assert idx.shape == (4, 17)


# ------------------------------------------------------------------------------------------
# codebook_stats
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_identical_codes_in_a_column_major_codebook_tie_to_the_smaller_index(backend, metric, generator):
    """Issue 32 item 8 for soft_assign: the ranking's code norms are summed in a fixed order, so a
    ``.t()`` view gives exactly the answer of its contiguous copy, and on the fused backends, which
    compute every column of a tile alike, two identical codes (i < j) next to every query come out as
    candidates (i, j) in that order (the torch backend's CPU GEMM may round an edge column of its
    blocking differently: see test_nearest_token; the weights, recomputed from the rows, tie anyway)."""
    for trial in range(10):
        q, cb = make_inputs(5, 40 + trial, 24, torch.float32, generator)
        i, j = sorted(torch.randperm(cb.shape[0], generator=generator)[:2].tolist())
        cb[j] = cb[i]
        q = cb[i] + 1e-3 * torch.randn(5, 24, generator=generator)
        column_major = cb.t().contiguous().t()
        token, idx, w = run(backend, q, column_major, 2, 0.1, metric=metric)
        assert torch.equal(idx, run(backend, q, cb, 2, 0.1, metric=metric).indices)
        assert (w[:, 0] == w[:, 1]).all()
        if backend != "torch":
            assert torch.equal(idx, torch.tensor([i, j]).expand(5, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])  # the cuda kernel still counts in fp32 (notes)
@pytest.mark.parametrize("deterministic", [False, True])
def test_counts_are_exact_past_2_to_the_24(backend, deterministic):
    """Issue 32 item 10: fp32 counts stopped at 2^24 (2^24 + 1 rounds back to 2^24). A weight of 2^24
    followed by unit weights shows it on a tiny input; Python integers are the reference."""
    idx = torch.tensor([[0, 1], [0, 1], [0, 0], [1, 0], [0, 1]])
    weights = torch.tensor([[2.0**24, 1.0], [1.0, 1.0], [1.0, 1.0], [3.0, 1.0], [1.0, 2.0**24]])
    want = [2**24 + 5, 2**24 + 5]  # code 0: 2^24 + 1 + 1 + 1 + 1 + 1; code 1: 1 + 1 + 3 + 2^24
    exact = run_stats(backend, idx, 2, weights=weights, deterministic=deterministic, counts_dtype=torch.float64)
    assert exact.counts.dtype == torch.float64 and exact.counts.tolist() == want
    rounded = run_stats(backend, idx, 2, weights=weights, deterministic=deterministic)
    assert rounded.counts.dtype == torch.float32
    assert torch.equal(rounded.counts, torch.tensor(want, dtype=torch.float64).float())  # correctly rounded


def test_unweighted_counts_are_exact_for_21_million_entries():
    """The case of the issue (20,971,520 entries of one code were counted as 16,777,216), torch backend."""
    entries = 5 * 2**22
    counts = codebook_stats(torch.zeros(entries, dtype=torch.int32), 3, counts_dtype=torch.float64,
                            backend="torch").counts
    assert counts.tolist() == [entries, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (1,), (129,), (57, 3), (200, 8)])
@pytest.mark.parametrize("with_weights,with_x", [(False, False), (True, False), (False, True), (True, True)])
def test_stats_match_bincount(backend, shape, with_weights, with_x, generator):
    k, d = 33, 20
    # Zipf-like skew: a few codes take most of the mass (heavy atomic contention)
    zipf = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 1.3
    n_entries = math.prod(shape)
    idx = torch.multinomial(zipf, max(n_entries, 1), replacement=True, generator=generator)[:n_entries]
    idx = idx.reshape(shape)
    weights = torch.rand(shape, generator=generator) if with_weights else None
    x = torch.randn(shape[0], d, generator=generator) if with_x else None
    got = run_stats(backend, idx, k, weights=weights, x=x)
    assert got.counts.dtype == torch.float32 and got.counts.shape == (k,)
    if with_x:
        assert got.sums.dtype == torch.float32 and got.sums.shape == (k, d)
    assert_stats_close(got, idx, k, weights, x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_low_precision_inputs_accumulate_in_fp32(backend, dtype, generator):
    k = 4
    idx = torch.zeros(3000, dtype=torch.int32)  # one hot code, many adds: bf16 accumulation would stall
    x = torch.full((3000, 8), 1.0, dtype=dtype)
    weights = torch.full((3000,), 0.5, dtype=dtype)
    counts, sums = run_stats(backend, idx, k, weights=weights, x=x)
    assert float(counts[0]) == 1500.0 and torch.equal(sums[0], torch.full((8,), 1500.0))
    assert (counts[1:] == 0).all() and (sums[1:] == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_stats_deterministic_mode_repeats_bitwise(backend, generator):
    idx = torch.randint(5, (300, 4), generator=generator)
    w = torch.rand(300, 4, generator=generator)
    x = torch.randn(300, 24, generator=generator)
    runs = [run_stats(backend, idx, 5, weights=w, x=x, deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0].counts, runs[1].counts) and torch.equal(runs[0].sums, runs[1].sums)
    assert_stats_close(runs[0], idx, 5, w, x, backend)


def test_soft_assign_feeds_stats(generator):
    q, cb = make_inputs(40, 10, 8, torch.float32, generator)
    _, idx, w = soft_assign(q, cb, 3, 0.3)
    counts, _ = codebook_stats(idx, 10, weights=w)
    # each row's 3 weights sum to 1 within gamma(5) (3 roundings of e_j / s, s off by gamma(2)); each count is
    # rounded once to fp32 (u) and the 10 counts summed in fp32 (gamma(9)): 40 within 40 gamma(15)
    torch.testing.assert_close(counts.sum().double(), torch.tensor(40.0, dtype=torch.float64), atol=40 * gamma(15),
                               rtol=0)
    assert F.one_hot(idx, 10).sum(1).max() == 1  # distinct codes per row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_stats_read_strided_weights_indices_and_x(backend, deterministic, generator):
    """Views of every input (issue 18: strided fp32 weights were read as if contiguous)."""
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    w = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    counts, _ = run_stats(backend, idx[:, 0], 4, weights=w[:, 0], deterministic=deterministic)
    assert torch.equal(counts, w[:, 0])  # one weight per code: its count is that fp32 value exactly
    big_idx = torch.randint(7, (3, 60, 5), generator=generator)
    big_w = torch.rand(5, 60, 3, generator=generator)
    big_x = torch.randn(12, 60, generator=generator)
    views = [(big_idx[1, :, 1::2], big_w[1::2, :, 2].T, big_x[::3].T),  # (60, 2) with no unit stride
             (big_idx[0, ::2, 3], big_w[1, ::2, 0], big_x[2:5, ::2].T)]  # (30,)
    for indices, weights, x in views:
        assert not (indices.is_contiguous() or weights.is_contiguous() or x.is_contiguous())
        got = run_stats(backend, indices, 7, weights=weights, x=x, deterministic=deterministic)
        assert_stats_close(got, indices, 7, weights, x, backend)
